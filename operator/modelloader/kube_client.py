"""The one place the control loop talks to the Kubernetes API itself: status patches (of
LoadedModels and OriginPolicies) and Events.

kopf owns watching, finalizers and events; the reconcile loop runs outside kopf's handlers (it
plans over all LoadedModels at once), so it patches `status` through the status subresource
with a merge patch, using the credentials kopf logged in with.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from modelloader import API_GROUP, API_VERSION
from modelloader.secret_data import secret_values

PLURAL = "loadedmodels"
POLICY_PLURAL = "originpolicies"


class KubeClient:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._server = info.server.rstrip("/")
        headers = {"Content-Type": "application/merge-patch+json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        connector = aiohttp.TCPConnector(ssl=_ssl_context(info))
        self._session = aiohttp.ClientSession(headers=headers, auth=auth, connector=connector)

    async def _patch_status(self, path: str, status: dict[str, Any]) -> bool:
        """False when the object is gone (deleted meanwhile); raises on other failures."""
        url = f"{self._server}/apis/{API_GROUP}/{API_VERSION}/{path}/status"
        async with self._session.patch(url, json={"status": status}) as response:
            if response.status == 404:
                return False
            response.raise_for_status()
            return True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """A LoadedModel's status."""
        return await self._patch_status(f"namespaces/{namespace}/{PLURAL}/{name}", status)

    async def patch_origin_status(self, origin: str, status: dict[str, Any]) -> bool:
        """An OriginPolicy's status (cluster-scoped)."""
        return await self._patch_status(f"{POLICY_PLURAL}/{origin}", status)

    async def post_event(
        self, involved: Mapping[str, Any], kind: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event about a LoadedModel, as `kubectl describe lm` shows them."""
        meta = involved.get("metadata", {})
        namespace = str(meta.get("namespace", "default"))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'lm')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "LoadedModel",
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "modelloader-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        url = f"{self._server}/api/v1/namespaces/{namespace}/events"
        async with self._session.post(
            url, json=event, headers={"Content-Type": "application/json"}
        ) as response:
            response.raise_for_status()

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None when there is none. Read when a model is loaded,
        never cached or logged: the operator keeps no tenant's credentials."""
        url = f"{self._server}/api/v1/namespaces/{namespace}/secrets/{name}"
        async with self._session.get(url) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            body = await response.json()
        return secret_values(body, namespace, name)

    async def close(self) -> None:
        await self._session.close()


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.server.startswith("http://"):
        return False
    if info.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        ca_data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        context = ssl.create_default_context(cafile=info.ca_path, cadata=ca_data)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context
