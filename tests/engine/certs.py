"""Test certificates for the engine tests, made with the openssl CLI.

One CA per site (as in production: each site's CA signs the certificates of
the nodes at that site) plus CAs nobody trusts, and node certificates with
the node name as DNS subjectAltName, usable for TLS server and client
(tandemd listens and dials with the same certificate).

`pki()` is one set per test session, in a temporary directory removed at
exit; `PKI.issue` caches, so each certificate is made once per session.
"""

from __future__ import annotations

import atexit
import functools
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

OPENSSL = "/usr/bin/openssl"
DAYS = "7"

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[node]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
{san}
"""


class Pem(NamedTuple):
    cert: Path
    key: Path


class PKI:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _run(self, *args: str) -> None:
        proc = subprocess.run([OPENSSL, *args], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")

    def _config(self, stem: str, cn: str, dns: tuple[str, ...]) -> Path:
        path = self.root / f"{stem}.cnf"
        san = f"subjectAltName = {', '.join('DNS:' + d for d in dns)}" if dns else ""
        path.write_text(_CONFIG.format(cn=cn, san=san))
        return path

    @functools.cache  # noqa: B019 - one PKI per session, never freed before exit anyway
    def ca(self, site: str) -> Pem:
        """The CA of a site ("site-a", "site-b", or any name for a CA nobody trusts)."""
        cert, key = self.root / f"{site}-ca.crt", self.root / f"{site}-ca.key"
        cnf = self._config(f"{site}-ca", f"Tandem test {site} CA", ())
        self._run("req", "-x509", "-config", str(cnf), "-extensions", "ca", "-newkey", "ec",
                  "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                  "-days", DAYS)
        key.chmod(0o600)
        return Pem(cert, key)

    @functools.cache  # noqa: B019
    def issue(self, site: str, name: str, dns: tuple[str, ...] | None = None) -> Pem:
        """A node certificate signed by the CA of `site`, for `name` (its CN and, by default, its
        only DNS subjectAltName; dns=() for a certificate with a CN only)."""
        dns = (name,) if dns is None else dns
        stem = f"{site}-{name}-{'_'.join(dns) or 'cn'}"
        cert, key, csr = (self.root / f"{stem}.{ext}" for ext in ("crt", "key", "csr"))
        cnf = self._config(stem, name, dns)
        ca = self.ca(site)
        self._run("req", "-new", "-config", str(cnf), "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", str(key), "-out", str(csr))
        self._run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
                  "-set_serial", "0x" + secrets.token_hex(16), "-days", DAYS, "-extfile", str(cnf),
                  "-extensions", "node", "-out", str(cert))
        key.chmod(0o600)
        return Pem(cert, key)

    def bundle(self, *sites: str) -> Path:
        """One PEM file with the CA certificates of these sites."""
        path = self.root / ("bundle-" + "+".join(sites) + ".crt")
        if not path.exists():
            path.write_bytes(b"".join(self.ca(s).cert.read_bytes() for s in sites))
        return path


@functools.cache
def pki() -> PKI:
    root = Path(tempfile.mkdtemp(prefix="tandem-pki-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return PKI(root)


def write_secret(path: Path, value: str | None = None) -> str:
    """A shared-secret file (mode 600); returns its content."""
    value = value or secrets.token_hex(32)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value
