"""Signed, expiring download URLs served by the gateway itself: external weights files and session traces.

Why signed URLs: the SDK and the cookbook download with a plain `urllib` GET (no API key), as they would
from a bucket. The gateway checks the tenant when it signs (`external_weights_urls`, `trace_export`), and
the URL is a capability until it expires: HMAC-SHA256 over what it names, its expiry and whose it is,
with a key every gateway replica shares (made once in the store). A download checks the signature and the
expiry, and that the thing still exists and still belongs to whom it was signed for (an unpublished or
deleted checkpoint stops downloading at once).

Files come from the checkpoint store, which the gateway reads directly: the local backend's directory,
or in Kubernetes the chart's checkpoint volume, mounted into the gateway pod at the same path as in the
trainers (`TINKERKUBE_GATEWAY_CHECKPOINT_DIR`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from tinkerkube_contract import paths
from tinkerkube_gateway.errors import Forbidden, NotFound, UnknownCheckpoint
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.store.records import CheckpointRecord
from tinkerkube_gateway.store.repo import AsyncRepo

DOWNLOADS = "/downloads"
SIGNING_SECRET = "download-url-signing"
MAX_FILES = 10_000  # an export is a handful of files; a directory with more is not one of ours
OWNER, PUBLIC = "owner", "public"  # how a checkpoint URL was granted: the owner's, or anyone's while published


@dataclass(frozen=True, slots=True)
class SignedUrls:
    urls: dict[str, str]  # file path relative to the checkpoint → URL
    expires: datetime


class UrlSigner:
    """Pure: sign and verify (what, expiry) pairs with one key; `mac` also signs the gateway's JWTs
    (services/keys.py)."""

    def __init__(self, key: bytes):
        self._key = key

    def mac(self, message: bytes) -> str:
        """HMAC-SHA256 of `message`, unpadded base64url (as in URLs, and as JWS HS256 signatures are)."""
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def signature(self, resource: str, expires: int) -> str:
        return self.mac(f"{resource}\n{expires}".encode())

    def verify(self, resource: str, expires: int, signature: str, now: float) -> None:
        if not hmac.compare_digest(self.signature(resource, expires), signature):
            raise Forbidden("this download link is not valid (its signature does not match); ask for new URLs")
        if now > expires:
            raise Forbidden(f"this download link expired at {datetime.fromtimestamp(expires, UTC).isoformat()}; "
                            "ask for new URLs")


class DownloadsService:
    def __init__(self, repo: AsyncRepo, registry: RegistryService, *, url_ttl_seconds: float,
                 public_url: str | None = None):
        self.repo = repo
        self.registry = registry
        self.url_ttl_seconds = url_ttl_seconds
        self.public_url = public_url.rstrip("/") if public_url else None
        self._signer: UrlSigner | None = None

    async def signer(self) -> UrlSigner:
        if self._signer is None:
            self._signer = UrlSigner(await self.repo.shared_secret(SIGNING_SECRET))
        return self._signer

    def base(self, request_base: str) -> str:
        """Where users reach this gateway: the configured public URL, else the address they called."""
        return self.public_url or request_base.rstrip("/")

    async def _url(self, base: str, path: str, resource: str, expires: int) -> str:
        query = urlencode({"expires": expires, "signature": (await self.signer()).signature(resource, expires)})
        return f"{self.base(base)}{DOWNLOADS}{path}?{query}"

    def _expiry(self) -> int:
        return int(time.time() + self.url_ttl_seconds)

    # ------------------------------------------------------------------ external weights

    async def external_weights_urls(self, tenant: str, run_id: str, checkpoint_id: str, base: str) -> SignedUrls:
        parsed = paths.parse_checkpoint_id(run_id, checkpoint_id)
        if parsed.kind is not paths.CheckpointKind.EXTERNAL_WEIGHTS:
            raise UnknownCheckpoint(f"{parsed} is not an external weights checkpoint: only those are downloaded "
                                    "(save one with save_weights_external)")
        record = await self.registry.resolve_readable(tenant, str(parsed))
        grant = OWNER if record.tenant == tenant else PUBLIC
        files = await asyncio.to_thread(_list_files, parsed.directory(self.registry.checkpoint_dir))
        if not files:
            raise NotFound(f"the files of {parsed} are gone from the checkpoint store")
        expires = self._expiry()
        urls = {}
        for name in files:
            path = f"/{grant}/{quote(parsed.run_id, safe='')}/{parsed.kind.value}/{parsed.name}/{quote(name)}"
            urls[name] = await self._url(base, path, _file_resource(record, grant, name), expires)
        return SignedUrls(urls, datetime.fromtimestamp(expires, UTC))

    async def external_file(self, grant: str, run_id: str, kind: str, name: str, file: str, expires: int,
                            signature: str) -> Path:
        """The file a signed URL names, after every check; NotFound/Forbidden otherwise."""
        parsed = paths.parse_tinker_path(f"{paths.SCHEME}{run_id}/{kind}/{name}")
        record = await self.repo.get_checkpoint(str(parsed))
        if record is None or grant not in (OWNER, PUBLIC):
            raise NotFound(f"{parsed} does not exist (deleted or expired)")
        (await self.signer()).verify(_file_resource(record, grant, file), expires, signature, time.time())
        if grant == PUBLIC and not record.public:
            raise Forbidden(f"{parsed} is no longer published")
        directory = parsed.directory(self.registry.checkpoint_dir)
        if not await asyncio.to_thread(_plain_file, directory, file):
            raise NotFound(f"{file!r} is not a file of {parsed}")
        return directory / file

    # ------------------------------------------------------------------ session traces

    async def trace_url(self, tenant: str, session_id: str, base: str) -> str:
        expires = self._expiry()
        return await self._url(base, f"/traces/{quote(session_id, safe='')}.json",
                               _trace_resource(tenant, session_id), expires)

    async def verify_trace(self, session_id: str, expires: int, signature: str) -> None:
        """The URL was signed for this session's owner and has not expired; NotFound/Forbidden otherwise."""
        session = await self.repo.get_session(session_id)
        if session is None:
            raise NotFound(f"unknown session {session_id!r}")
        (await self.signer()).verify(_trace_resource(session.tenant, session_id), expires, signature, time.time())


def _file_resource(record: CheckpointRecord, grant: str, file: str) -> str:
    # created_at: a checkpoint deleted and saved again under its name is another one; old links stop.
    owner = record.tenant if grant == OWNER else PUBLIC
    return f"file\n{owner}\n{record.tinker_path}\n{record.created_at!r}\n{file}"


def _trace_resource(tenant: str, session_id: str) -> str:
    return f"trace\n{tenant}\n{session_id}"


def _list_files(directory: Path) -> list[str]:
    """Regular files under `directory` (no links, nothing hidden), as relative POSIX paths."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not _plain_file(directory, relative):
            continue
        found.append(relative)
        if len(found) > MAX_FILES:
            raise NotFound(f"{directory.name} holds more than {MAX_FILES} files; it is not an export")
    return found


def _plain_file(directory: Path, relative: str) -> bool:
    """`relative` names a regular file inside `directory`: no '..', nothing hidden, no link on the way."""
    parts = relative.split("/")
    if not relative or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return False
    path = directory
    for part in parts:
        path = path / part
        if path.is_symlink():
            return False
    return path.is_file()
