"""A small async Kubernetes API client for the children the operator owns (aiohttp, JSON only).

kopf watches and posts events with its own client; this one reads and writes Deployments, Services,
PodDisruptionBudgets and our status with the same credentials (a `kopf.ConnectionInfo`). Transient
failures (5xx, 429, connection errors) are retried with backoff here; conflicts and not-found are
raised as their own exceptions so the reconciler can act on them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

FIELD_MANAGER = "pagedserve-operator"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# apiVersion, kind -> plural, for the kinds this operator touches.
PLURALS = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("pagedserve.io/v1alpha1", "LLMDeployment"): "llmdeployments",
}


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def path(api_version: str, plural: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix, "namespaces", namespace, plural] + ([name] if name else []) + ([subresource] if subresource else [])
    return "/".join(parts)


def object_path(obj: dict[str, Any], subresource: str | None = None) -> str:
    """The URL of a named object, from its own apiVersion/kind/metadata."""
    plural = PLURALS[(obj["apiVersion"], obj["kind"])]
    meta = obj["metadata"]
    return path(obj["apiVersion"], plural, meta["namespace"], meta["name"], subresource)


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    if getattr(info, "insecure", False):
        return False
    if not str(info.server).startswith("https"):
        return True  # plain HTTP (tests); aiohttp ignores it
    ca_data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
    context = ssl.create_default_context(cafile=info.ca_path or None, cadata=ca_data or None)
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data:
        cert = _temp_file(info.certificate_data)
    if info.private_key_data:
        key = _temp_file(info.private_key_data)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _temp_file(data: str | bytes) -> str:
    fd, name = tempfile.mkstemp(prefix="pagedserve-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return name


class Kube:
    """JSON requests against one API server. Use as `async with Kube(info) as kube:`."""

    def __init__(
        self, info: Any, *, token_path: str | None = None, retries: int = 4, backoff: float = 0.1,
        timeout: float = 30.0,
    ):
        self.info = info
        self.token_path = token_path
        self.retries = retries
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        token = self.info.token
        if self.token_path:  # projected service-account tokens rotate: re-read, as client-go does
            with open(self.token_path) as f:
                token = f.read().strip() or token
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"{self.info.scheme or 'Bearer'} {token}"
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self.info))
            self._session = aiohttp.ClientSession(str(self.info.server).rstrip("/"), connector=connector,
                                                  timeout=self.timeout)
        return self._session

    async def request(
        self, method: str, url: str, *, params: dict[str, str] | None = None, body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; retries 5xx/429/connection errors, raises NotFound, Conflict or ApiError."""
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        for attempt in range(self.retries + 1):
            try:
                async with self._client().request(method, url, params=params, json=body, headers=headers) as resp:
                    data = await resp.json(content_type=None) if resp.content_length != 0 else {}
                    if resp.status < 400:
                        return data or {}
                    message = (data or {}).get("message", resp.reason) if isinstance(data, dict) else resp.reason
                    if resp.status == 404:
                        raise NotFound(resp.status, message, data)
                    if resp.status == 409:
                        raise Conflict(resp.status, message, data)
                    if resp.status < 500 and resp.status != 429:
                        raise ApiError(resp.status, message, data)
                    error: Exception = ApiError(resp.status, message, data)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                error = exc
            if attempt == self.retries:
                raise error
            delay = self.backoff * 2**attempt
            logger.debug("%s %s failed (%s); retrying in %.1fs", method, url, error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def get(self, url: str) -> dict[str, Any]:
        return await self.request("GET", url)

    async def get_or_none(self, url: str) -> dict[str, Any] | None:
        try:
            return await self.get(url)
        except NotFound:
            return None

    async def list(self, url: str, label_selector: dict[str, str]) -> list[dict[str, Any]]:
        """Objects matching the labels (filtered here too, so a server that ignores the selector is fine)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(label_selector.items()))
        data = await self.request("GET", url, params={"labelSelector": selector})
        # A real API server's list items carry no apiVersion/kind (only the list does); object_path needs them.
        kind = str(data.get("kind", "")).removesuffix("List")
        typed = {"apiVersion": data.get("apiVersion"), "kind": kind} if kind and data.get("apiVersion") else {}
        return [
            {**typed, **item} for item in data.get("items") or []
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in label_selector.items())
        ]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        url = object_path(obj).rsplit("/", 1)[0]
        return await self.request("POST", url, body=obj, params={"fieldManager": FIELD_MANAGER})

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: our fields become exactly `obj`'s; fields we set before and dropped are removed."""
        return await self.request(
            "PATCH", object_path(obj), body=obj, content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    async def merge_patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", object_path(obj), body=patch, content_type="application/merge-patch+json",
                                  params={"fieldManager": FIELD_MANAGER})

    async def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", object_path(obj, "status"), body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def delete(self, obj: dict[str, Any]) -> None:
        try:
            await self.request("DELETE", object_path(obj), body={"propagationPolicy": "Background"})
        except NotFound:
            pass
