"""A pod's volumes as local folders, and the bind mounts that put them at each container's mountPath.

emptyDir -> a folder of the pod (medium: Memory -> a folder under /dev/shm, already a tmpfs);
hostPath -> the path itself; configMap, secret, downwardAPI and projected (serviceAccountToken,
configMap, secret, downwardAPI) -> files written by the agent and refreshed while the pod runs
(tokens at 80% of their lifetime, like the kubelet). Other volume types are refused with a message.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .envs import expand, field_ref, resource_field_ref

Pod = dict[str, Any]
REFRESH_S = 60.0


class VolumeError(Exception):
    """A volume cannot be set up (yet): a missing ConfigMap, an unsupported type, a failed token request."""


class VolumeApi(Protocol):
    def get_data(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None: ...

    def get_binary_data(self, kind: str, namespace: str, name: str) -> Mapping[str, bytes] | None: ...

    def request_token(
        self, pod: Pod, audience: str | None, expiration_seconds: int
    ) -> tuple[str, float]: ...


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


class PodVolumes:
    """Materialises the volumes of one pod under `pod_dir/volumes` and keeps them fresh."""

    def __init__(self, pod: Pod, pod_dir: Path, api: VolumeApi, pod_ip: str, host_ip: str) -> None:
        self.pod, self.api, self.pod_ip, self.host_ip = pod, api, pod_ip, host_ip
        self.root = pod_dir / "volumes"
        self.paths: dict[str, Path] = {}
        self._token_refresh_at: dict[tuple[str, str], float] = {}
        self._next_refresh = 0.0
        self._shm: list[Path] = []

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    def prepare(self) -> None:
        for volume in self.pod["spec"].get("volumes", []):
            self.paths[volume["name"]] = self._prepare_one(volume)
        self._next_refresh = time.monotonic() + REFRESH_S

    def _prepare_one(self, volume: dict) -> Path:
        name = volume["name"]
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory" and Path("/dev/shm").is_dir():
                path = Path("/dev/shm") / f"pagedserve-{self.pod['metadata']['uid']}-{name}"
                self._shm.append(path)
            else:
                path = self.root / name
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "hostPath" in volume:
            return self._host_path(volume["hostPath"])
        if any(k in volume for k in ("configMap", "secret", "downwardAPI", "projected")):
            path = self.root / name
            self._write_files(volume, path, time.monotonic())
            return path
        kinds = sorted(k for k in volume if k != "name")
        raise VolumeError(f"volume {name!r}: type {kinds} is not supported by the local node agent")

    @staticmethod
    def _host_path(spec: dict) -> Path:
        path, kind = Path(spec["path"]), spec.get("type", "")
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        elif kind == "Directory" and not path.is_dir():
            raise VolumeError(f"hostPath {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise VolumeError(f"hostPath {path} is not a file")
        return path

    def refresh(self) -> None:
        """Rewrite configMap/secret files and renew tokens that are due; cheap when nothing is due."""
        now = time.monotonic()
        due_token = any(now >= at for at in self._token_refresh_at.values())
        if now < self._next_refresh and not due_token:
            return
        for volume in self.pod["spec"].get("volumes", []):
            if volume["name"] in self.paths and any(k in volume for k in ("configMap", "secret", "projected")):
                self._write_files(volume, self.paths[volume["name"]], now)
        self._next_refresh = now + REFRESH_S

    def _write_files(self, volume: dict, folder: Path, now: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"].get("sources", []):
                self._write_source(volume["name"], source, folder, mode, now)
        else:
            kind = next(k for k in ("configMap", "secret", "downwardAPI") if k in volume)
            self._write_source(volume["name"], {kind: volume[kind]}, folder, volume[kind].get("defaultMode", 0o644), now)

    def _write_source(self, vol: str, source: dict, folder: Path, mode: int, now: float) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            key = (vol, spec["path"])
            if key in self._token_refresh_at and now < self._token_refresh_at[key]:
                return
            lifetime = int(spec.get("expirationSeconds", 3600))
            token, _ = self.api.request_token(self.pod, spec.get("audience") or None, lifetime)
            _write_atomic(folder / spec["path"], token.encode(), mode)
            self._token_refresh_at[key] = now + 0.8 * lifetime
        elif "configMap" in source or "secret" in source:
            kind, spec = ("ConfigMap", source["configMap"]) if "configMap" in source else ("Secret", source["secret"])
            obj_name = spec.get("name") or spec.get("secretName")
            data = self.api.get_binary_data(kind, self.namespace, obj_name)
            if data is None:
                if spec.get("optional"):
                    return
                raise VolumeError(f"volume {vol!r}: {kind} {self.namespace}/{obj_name} not found")
            for key, path, item_mode in self._items(spec, data, vol, kind):
                _write_atomic(folder / path, data[key], item_mode or mode)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                if "fieldRef" in item:
                    value = field_ref(self.pod, item["fieldRef"]["fieldPath"], self.pod_ip, self.host_ip)
                else:
                    ref = item["resourceFieldRef"]
                    container = next(c for c in self.pod["spec"]["containers"] if c["name"] == ref["containerName"])
                    value = resource_field_ref(container, ref)
                _write_atomic(folder / item["path"], value.encode(), item.get("mode") or mode)

    @staticmethod
    def _items(spec: dict, data: Mapping[str, bytes], vol: str, kind: str):
        if not spec.get("items"):
            return [(key, key, None) for key in data]
        out = []
        for item in spec["items"]:
            if item["key"] not in data:
                if spec.get("optional"):
                    continue
                raise VolumeError(f"volume {vol!r}: {kind} has no key {item['key']!r}")
            out.append((item["key"], item["path"], item.get("mode")))
        return out

    def mounts_for(self, container: dict, env: Mapping[str, str]) -> list[Mount]:
        """The container's volumeMounts as (host source, mountPath) pairs, parents before children."""
        mounts = []
        for vm in container.get("volumeMounts", []):
            if vm["name"] not in self.paths:
                raise VolumeError(f"volumeMount {vm['name']!r} names no volume of the pod")
            source = self.paths[vm["name"]]
            sub = vm.get("subPath") or expand(vm.get("subPathExpr", ""), env)
            if sub:
                if sub.startswith("/") or ".." in Path(sub).parts:
                    raise VolumeError(f"subPath {sub!r} must be a relative path inside the volume")
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly"))))
        return sorted(mounts, key=lambda m: len(Path(m.target).parts))

    def cleanup(self) -> None:
        for path in self._shm:
            shutil.rmtree(path, ignore_errors=True)


def decode_secret(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}
