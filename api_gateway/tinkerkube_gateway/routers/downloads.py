"""The files behind signed download URLs (services/downloads.py): no API key, the signature is the grant."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse

from tinkerkube_gateway.deps import Svc
from tinkerkube_gateway.services.downloads import DOWNLOADS

router = APIRouter(prefix=DOWNLOADS, tags=["downloads"])
Expires = Query(ge=0, lt=2**53)
Signature = Query(min_length=1, max_length=200)


@router.get("/{grant}/{run_id}/{kind}/{name}/{file:path}", summary="A file of an external weights checkpoint")
async def checkpoint_file(svc: Svc, grant: str, run_id: str, kind: str, name: str, file: str,
                          expires: int = Expires, signature: str = Signature) -> FileResponse:
    path = await svc.downloads.external_file(grant, run_id, kind, name, file, expires, signature)
    return FileResponse(path, media_type="application/octet-stream")


@router.get("/traces/{session_id}.json", summary="A session's trace (Chrome/Perfetto trace JSON)")
async def session_trace(svc: Svc, session_id: str, expires: int = Expires,
                        signature: str = Signature) -> JSONResponse:
    await svc.downloads.verify_trace(session_id, expires, signature)
    return JSONResponse(await svc.traces.build(session_id),
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.json"'})
