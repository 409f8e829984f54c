"""An emulated Kubernetes API server for the component and cluster tiers: kmock over real HTTP.

kmock 0.8's KubernetesEmulator keeps objects in memory and serves list/watch/get/create/patch/delete,
but assigns no uid/resourceVersion/generation/creationTimestamp, which kopf and our status logic need.
`StampingEmulator` adds them. `EmulatedCluster` runs it on 127.0.0.1 (a free port) in a thread of its
own with its own event loop, so sync code (the tinker SDK, the kubernetes client) and async tests can
both talk to it; the operator and the test kubelet can run as tasks on that same loop.

    with EmulatedCluster() as cluster:
        cluster.url                      # http://127.0.0.1:<port>
        cluster.run(coro)                # run a coroutine on the cluster's loop, wait for its result
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import itertools
import threading
import uuid
from collections.abc import Awaitable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import jsonpatch
import kmock
import yaml
from kmock import action
from kmock._internal import parsing as _kmock_parsing

from tinkerkube_contract.resource import (
    GROUP,
    KIND,
    PLURAL,
    POOL_KIND,
    POOL_PLURAL,
    POOL_SHORT_NAME,
    POOL_SINGULAR,
    SHORT_NAME,
    SINGULAR,
    VERSION,
)

T = TypeVar("T")
_MATCHING: contextvars.ContextVar[kmock.Request | None] = contextvars.ContextVar("kmock_matching", default=None)
REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "trainingsession.yaml"
POOL_CRD_PATH = REPO / "crds" / "trainerpool.yaml"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
DEFAULT_NAMESPACES = ("default",)


def _parse_path(path: str, _parse: Any = _kmock_parsing.parse_path) -> Any:
    """kmock 0.8 reads `/api/v1/namespaces[/NAME]` as "inside a namespace" and fails on the list (a 500):
    the Namespace resource itself is meant. kopf lists and watches namespaces whenever it serves named
    namespaces (the chart's operator does: TINKERKUBE_OPERATOR_NAMESPACES), so parse those two paths right."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) in (3, 4):
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None)
    return _parse(path)


_kmock_parsing.parse_path = _parse_path


class StampingEmulator(kmock.KubernetesEmulator):
    """Assigns uid, creationTimestamp, generation and a fresh resourceVersion as an API server would."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1000)

    def _current(self, request: kmock.Request) -> Any:
        with_key = (request.resource, request.namespace, request.name)
        try:
            return self.objects[with_key]  # type: ignore[index]
        except KeyError:
            return None

    def __iter__(self) -> Iterator[kmock.Request]:
        """NB: kmock matches each request against its reactions by scanning *every* request served so
        far (`request in payload._source`), which is quadratic over a test; we declare no reactions of
        our own, so the request being matched is the only one that can matter."""
        current = _MATCHING.get()
        if current is not None:
            yield current
        else:
            yield from super().__iter__()

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        token = _MATCHING.set(request)
        try:
            return await self._handle_stamped(request)
        finally:
            _MATCHING.reset(token)
            if len(self._requests) > 1000:  # nothing reads old requests back; keep memory flat
                del self._requests[:-100]

    async def _handle_stamped(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action == action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)), generation=1,
                        creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
        elif request.resource is not None and request.action == action.UPDATE and request.name:
            self._stamp_update(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:  # a stale resourceVersion: the API server says 422
            await self._nudge(request)
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc

    async def _nudge(self, request: kmock.Request) -> None:
        """kmock's watch replays a snapshot of old states on (re)connect, so a client can act on a stale
        version and wait for a "next" event that never comes; re-announce the current state instead."""
        current = self._current(request)
        if current is not None and request.resource is not None:
            await self._buses[request.resource].put({"type": "MODIFIED", "object": current.raw})

    def _stamp_update(self, request: kmock.Request) -> None:
        rv = str(next(self._rv))
        if isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {}) if request.data.get("metadata") is not None else None
            if meta is None:
                request.data["metadata"] = meta = {}
            meta["resourceVersion"] = rv
            current = self._current(request)
            if "spec" in request.data and request.subresource != "status" and current is not None:
                meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        elif isinstance(request.data, list):
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})


def declare_resources(emulator: kmock.KubernetesEmulator, namespaces: tuple[str, ...] = DEFAULT_NAMESPACES) -> None:
    """What kopf, the operator, the gateway backend and the kubelet use; kopf's observers block silently
    on anything undeclared (ENVIRONMENT.md)."""
    res = emulator.resources
    res["v1/namespaces"] = {"kind": "Namespace", "namespaced": False, "verbs": VERBS}
    res["apiextensions.k8s.io/v1/customresourcedefinitions"] = {
        "kind": "CustomResourceDefinition", "namespaced": False, "verbs": VERBS}
    res[f"{GROUP}/{VERSION}/{PLURAL}"] = {
        "kind": KIND, "singular": SINGULAR, "namespaced": True, "verbs": VERBS,
        "shortnames": {SHORT_NAME}, "categories": {"all"}, "subresources": {"status"}}
    res[f"{GROUP}/{VERSION}/{POOL_PLURAL}"] = {
        "kind": POOL_KIND, "singular": POOL_SINGULAR, "namespaced": True, "verbs": VERBS,
        "shortnames": {POOL_SHORT_NAME}, "categories": {"all"}, "subresources": {"status"}}
    res["v1/pods"] = {"kind": "Pod", "singular": "pod", "namespaced": True, "verbs": VERBS,
                      "subresources": {"status"}}
    for plural, kind in (("services", "Service"), ("events", "Event"), ("secrets", "Secret")):
        res[f"v1/{plural}"] = {"kind": kind, "singular": plural[:-1], "namespaced": True, "verbs": VERBS}
    for path in (CRD_PATH, POOL_CRD_PATH):
        crd = yaml.safe_load(path.read_text())
        crd["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1")
        emulator.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = crd
    for ns in namespaces:
        add_namespace(emulator, ns)


def add_namespace(emulator: kmock.KubernetesEmulator, name: str) -> None:
    emulator.objects["v1/namespaces", None, name] = {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "1"}}


class EmulatedCluster:
    """The emulator on a free 127.0.0.1 port, served from a background thread's event loop."""

    def __init__(self, namespaces: tuple[str, ...] = DEFAULT_NAMESPACES) -> None:
        self.namespaces = namespaces
        self.loop = asyncio.new_event_loop()
        self.emulator: StampingEmulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._serve, name="kmock-cluster", daemon=True)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"emulated cluster did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to __enter__ if startup failed
            self._error = exc
            self._ready.set()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with StampingEmulator() as emulator, kmock.Server(emulator) as server:
            declare_resources(emulator, self.namespaces)
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            await asyncio.sleep(0)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the cluster's loop (e.g. the operator or the kubelet); returns at once."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.submit(coro).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """From another event loop (an async test): await a coroutine that runs on the cluster's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def add_peering(self, name: str) -> None:
        """kopf's cluster-wide peering resource and one object: operator replicas elect a leader in it."""
        async def add() -> None:
            assert self.emulator is not None
            self.emulator.resources["kopf.dev/v1/clusterkopfpeerings"] = {
                "kind": "ClusterKopfPeering", "singular": "clusterkopfpeering", "namespaced": False, "verbs": VERBS}
            self.emulator.objects["kopf.dev/v1/clusterkopfpeerings", None, name] = {
                "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "1"}}
        self.run(add())

    def add_namespace(self, name: str) -> None:
        async def add() -> None:
            assert self.emulator is not None
            add_namespace(self.emulator, name)
        self.run(add())


async def cancel(task: Awaitable[Any] | asyncio.Task[Any]) -> None:
    if isinstance(task, asyncio.Task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class OperatorProcess:
    """The embedded operator in a thread with its own event loop (as its own process would be), so that
    stopping it cancels nothing of the emulator's or kubelet's; stop() then start() = an operator restart."""

    def __init__(self, cluster: EmulatedCluster, settings: Any) -> None:
        self.cluster, self.settings = cluster, settings
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        from tinkerkube_operator import main as operator_main

        self._stop, ready = threading.Event(), threading.Event()
        stop = self._stop

        def serve() -> None:
            try:
                asyncio.run(operator_main.run(self.settings, stop_flag=stop, ready_flag=ready))
            except BaseException as exc:
                self.error = exc
                ready.set()

        self._thread = threading.Thread(target=serve, name="operator", daemon=True)
        self._thread.start()
        if not ready.wait(30) or self.error is not None:
            raise RuntimeError(f"operator did not start: {self.error!r}")

    def stop(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join(30)
            self._stop = None


class Api:
    """A tiny sync REST client for test assertions (what `kubectl get -o json` would show)."""

    def __init__(self, url: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=30)

    @staticmethod
    def path(plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/v1/namespaces/{namespace}/{plural}" if plural in CORE else \
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        return base + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        resp = self.http.get(self.path(plural, namespace, name))
        return resp.json() if resp.status_code == 200 else None

    def list(self, plural: str, namespace: str, **labels: str) -> list[dict[str, Any]]:
        items = self.http.get(self.path(plural, namespace)).json().get("items") or []
        return [i for i in items if i["metadata"].get("namespace") == namespace
                and all((i["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(self.path(plural, namespace), json=body)
        resp.raise_for_status()
        return resp.json()

    def patch(self, plural: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> None:
        resp = self.http.patch(self.path(plural, namespace, name, sub), json=body,
                               headers={"content-type": "application/merge-patch+json"})
        resp.raise_for_status()

    def delete(self, plural: str, namespace: str, name: str) -> int:
        return self.http.delete(self.path(plural, namespace, name)).status_code

    def close(self) -> None:
        self.http.close()


CORE = {"pods", "services", "events", "secrets"}
