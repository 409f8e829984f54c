"""The few Kubernetes API calls the operator makes, with the sync `kubernetes` client in threads.

Exactly these (RBAC derives from this list; kopf itself also watches/patches what handlers.py names):
  tinkerkube.dev trainingsessions: get, list; trainingsessions/status: patch
  tinkerkube.dev trainerpools: get, list, create, patch, delete; trainerpools/status: patch
  core pods: create, list, delete;  core services: create, delete
  kopf.dev kopfpeerings / clusterkopfpeerings: list (is this replica the leader? `leader`)
Raw JSON in and out (`_preload_content=False`): no model (de)serialisation on the hot path.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from tinkerkube_contract.resource import GROUP, LABEL_SESSION, PLURAL, POOL_PLURAL, VERSION

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"  # kopf's own peering resources (the chart's KopfPeering)


def api_client(api_url: str | None) -> kubernetes.client.ApiClient:
    """An explicit URL (no auth: tests, `kubectl proxy`), else in-cluster config, else ~/.kube/config."""
    if api_url:
        config = kubernetes.client.Configuration()
        config.host = api_url.rstrip("/")
    else:
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
    config.connection_pool_maxsize = 32
    return kubernetes.client.ApiClient(config)


def _json(response: Any) -> Any:
    return json.loads(response.data) if response.data else None


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient):
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    async def get_session(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get_object(PLURAL, namespace, name)

    async def patch_session_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.patch_object_status(PLURAL, namespace, name, status)

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        def call() -> Any:
            return _json(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _preload_content=False))
        return await _absent_is_none(call)

    async def patch_object_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        def call() -> Any:
            return self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status}, _preload_content=False)
        await _absent_is_none(call)

    async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        def call() -> Any:
            return _json(self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, _preload_content=False))
        items = (await asyncio.to_thread(call)).get("items") or []
        return [i for i in items if i["metadata"].get("namespace", namespace) == namespace]

    async def create_pool(self, body: dict[str, Any]) -> bool:
        """False when it already exists."""
        def call() -> Any:
            return self.custom.create_namespaced_custom_object(
                GROUP, VERSION, body["metadata"]["namespace"], POOL_PLURAL, body, _preload_content=False)
        try:
            await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch_pool(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        def call() -> Any:
            return self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, POOL_PLURAL, name, patch, _preload_content=False)
        await _absent_is_none(call)

    async def delete_pool(self, namespace: str, name: str) -> None:
        await _absent_is_none(lambda: self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, POOL_PLURAL, name, _preload_content=False))

    async def create_pod(self, body: dict[str, Any]) -> bool:
        """False when it already exists: creation is idempotent by name."""
        return await self._create(self.core.create_namespaced_pod, body)

    async def create_service(self, body: dict[str, Any]) -> bool:
        return await self._create(self.core.create_namespaced_service, body)

    async def delete_pod(self, namespace: str, name: str) -> None:
        await _absent_is_none(lambda: self.core.delete_namespaced_pod(
            name, namespace, grace_period_seconds=5, _preload_content=False))

    async def delete_service(self, namespace: str, name: str) -> None:
        await _absent_is_none(lambda: self.core.delete_namespaced_service(name, namespace, _preload_content=False))

    async def list_session_pods(self, namespace: str, session: str, label: str = LABEL_SESSION) -> list[dict[str, Any]]:
        """Filters client-side as well: some API servers (and emulators) ignore label selectors. `label`:
        LABEL_SESSION (a session's own pods) or LABEL_POOL (a pool's)."""
        def call() -> Any:
            return _json(self.core.list_namespaced_pod(
                namespace, label_selector=f"{label}={session}", _preload_content=False))
        items = (await asyncio.to_thread(call)).get("items") or []
        return [p for p in items if (p["metadata"].get("labels") or {}).get(label) == session]

    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        """kopf's peering object (cluster-wide when `namespace` is None), by a list: the role may only list it."""
        def call() -> Any:
            if namespace is None:
                return _json(self.custom.list_cluster_custom_object(
                    PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", _preload_content=False))
            return _json(self.custom.list_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", _preload_content=False))
        found = await _absent_is_none(call)
        items = (found or {}).get("items") or []
        return next((i for i in items if i["metadata"].get("name") == name
                     and i["metadata"].get("namespace", namespace) == namespace), None)

    async def _create(self, fn: Any, body: dict[str, Any]) -> bool:
        try:
            await asyncio.to_thread(fn, body["metadata"]["namespace"], body, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def close(self) -> None:
        self.client.close()


async def _absent_is_none(call: Any) -> Any:
    try:
        return await asyncio.to_thread(call)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
