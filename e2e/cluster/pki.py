"""The cluster's certificates and keys, made with the openssl command line.

One CA signs everything: the API server's and etcd's serving certs and a client cert per identity
(admin, controller-manager, scheduler, each node, Prometheus, the service proxy). The API server trusts
client certs by this CA, so each identity's CN/O become its user and groups, and RBAC decides the rest.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .prereqs import require_openssl

DAYS = 30


@dataclass(frozen=True)
class Identity:
    """A certificate to issue: `user` becomes the CN, `groups` the O fields."""

    name: str
    user: str
    groups: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    server: bool = False
    client: bool = True


@dataclass
class Pki:
    folder: Path
    openssl: str = field(default_factory=require_openssl)

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def _run(self, *args: str, stdin: str | None = None) -> None:
        done = subprocess.run([self.openssl, *args], input=stdin, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")

    def _ec_key(self, path: Path) -> None:
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        path.chmod(0o600)

    def make_ca(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ec_key(self.ca_key)
        self._run(
            "req", "-x509", "-new", "-key", str(self.ca_key), "-out", str(self.ca_cert),
            "-days", str(DAYS), "-subj", "/CN=pagedserve-local-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(self, ident: Identity) -> None:
        key, csr, crt = self.key(ident.name), self.folder / f"{ident.name}.csr", self.cert(ident.name)
        self._ec_key(key)
        subject = "".join(f"/O={g}" for g in ident.groups) + f"/CN={ident.user}"
        self._run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
        usages = [u for u, on in (("serverAuth", ident.server), ("clientAuth", ident.client)) if on]
        ext = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={','.join(usages)}",
        ]
        sans = [f"DNS:{d}" for d in ident.dns] + [f"IP:{i}" for i in ident.ips]
        if sans:
            ext.append(f"subjectAltName={','.join(sans)}")
        ext_file = self.folder / f"{ident.name}.ext"
        ext_file.write_text("\n".join(ext) + "\n")
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-out", str(crt), "-days", str(DAYS), "-extfile", str(ext_file),
        )  # fmt: skip
        csr.unlink()
        ext_file.unlink()

    def make_service_account_keys(self) -> tuple[Path, Path]:
        """RSA key pair the API server signs service-account tokens with (controller-manager too)."""
        key, pub = self.folder / "sa.key", self.folder / "sa.pub"
        self._run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
        key.chmod(0o600)
        self._run("pkey", "-in", str(key), "-pubout", "-out", str(pub))
        return key, pub
