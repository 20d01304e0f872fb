"""The real server: `tandem-center serve` (uvicorn) in a subprocess, over TCP and TLS, and the
console script's migrate/token commands; schemathesis against its OpenAPI spec."""

import ssl
import subprocess
import time
from collections import Counter, defaultdict

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tandem.center.app import create_app
from tandem.center.config import Config

API = "/api/v1"


@pytest.fixture(scope="module")
def live(module_db, tmp_path_factory, server_class):
    server = server_class(tmp_path_factory.mktemp("live"), module_db.dsn).start()
    server.db = module_db
    yield server
    server.stop()


def test_end_to_end_with_a_token_from_the_cli(live):
    r = live.cli("token", "create", "--name", "ansible", "--role", "operator")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("tdc_") and "\n" not in token
    again = live.cli("token", "create", "--name", "ansible", "--role", "admin")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = live.cli("token", "create", "--name", "Bad Name", "--role", "admin")
    assert bad.returncode == 2 and "token name" in bad.stderr
    admin = {"Authorization": f"Bearer {live.db.tokens['admin']}"}
    ops = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=live.url + API, timeout=10) as http:
        assert http.get(live.url + "/health").json() == {"status": "ok"}
        assert http.get("/sites").status_code == 401
        site = http.post("/sites", json={"name": "e2e-site"}, headers=admin)
        assert site.status_code == 201, site.text
        assert http.post("/sites", json={"name": "e2e-2"}, headers=ops).status_code == 403
        run = http.post("/runs", json={"kind": "drill"}, headers=ops).json()
        assert http.post(f"/runs/{run['id']}/steps", json={"name": "boot", "status": "ok"},
                         headers=ops).status_code == 201
        done = http.post(f"/runs/{run['id']}/finish", json={"state": "succeeded"}, headers=ops).json()
        assert done["state"] == "succeeded" and [s["name"] for s in done["steps"]] == ["boot"]
        r = http.post("/sites", content=b"x" * 70000, headers={**admin, "Content-Type": "application/json"})
        assert r.status_code == 413
        audit = http.get("/audit", headers=admin).json()
        mine = [(a["actor"], a["action"], a["ok"]) for a in audit]
        assert ("test-admin", "site.create", True) in mine
        assert ("ansible", "run.finish", True) in mine
        assert ("cli", "token.create", True) in mine
        spec = http.get(live.url + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_serve_refuses_a_database_with_pending_migrations(pg, tmp_path, server_class):
    server = server_class(tmp_path, pg.dsn(pg.create_db()))
    r = server.cli("serve")
    assert r.returncode == 2 and "pending" in r.stderr
    assert server.cli("migrate").returncode == 0


def test_unix_socket(module_db, tmp_path, server_class):
    sock = tmp_path / "center.sock"
    server = server_class(tmp_path, module_db.dsn, unix_socket=str(sock))
    transport = httpx.HTTPTransport(uds=str(sock))
    with server.cli_popen("serve") as proc:
        try:
            deadline = time.monotonic() + 60
            while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            with httpx.Client(transport=transport, base_url="http://center", timeout=10) as http:
                assert http.get("/health").json() == {"status": "ok"}
                reader = {"Authorization": f"Bearer {module_db.tokens['reader']}"}
                assert http.get(API + "/sites", headers=reader).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_serves_health_503_while_the_database_is_away(tmp_path, server_class):
    """During a control-plane failover the database may be unreachable when the service starts:
    it starts anyway, says so on /health, and answers 503 instead of hanging or crashing."""
    server = server_class(tmp_path, f"host={tmp_path}/nowhere dbname=tandem user=postgres connect_timeout=2")
    server.start()
    try:
        r = httpx.get(server.url + "/health", timeout=30)
        assert (r.status_code, r.json()) == (503, {"status": "unavailable"})
        r = httpx.get(server.url + API + "/sites", headers={"Authorization": "Bearer tdc_x"}, timeout=60)
        assert r.status_code == 503 and r.json() == {"detail": "the database is unavailable"}
    finally:
        server.stop()
    assert "database unreachable at start" in server.log.read_text()


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(d) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): key usage on the CA, AKI on the leaves.
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    leaf = "authorityKeyIdentifier=keyid\nkeyUsage=critical,digitalSignature\n"
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(leaf + ext + "\n")
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def test_mutual_tls(module_db, tmp_path, server_class):
    _pki(tmp_path)
    server = server_class(tmp_path, module_db.dsn, tls_cert=str(tmp_path / "server.crt"),
                    tls_key=str(tmp_path / "server.key"), tls_client_ca=str(tmp_path / "ca.crt"),
                    tls_require_client_cert=True)
    with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with_cert.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
    without_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    server.start("https", verify=with_cert)
    try:
        assert httpx.get(server.url + "/health", verify=with_cert).json() == {"status": "ok"}
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health", verify=without_cert)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health")
    finally:
        server.stop()


# -- schemathesis: no generated request, valid or not, gets a server error ---------------------------

MAX_EXAMPLES = 15
SEEN: dict[str, set[int]] = defaultdict(set)     # operation -> status codes answered


# The spec of the app itself (building it needs no database); the requests go to the live server.
# (schemathesis.pytest.from_fixture would load it from the server, but fails under pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(Config()).openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=MAX_EXAMPLES, allow_x00=True, with_security_parameters=False)


def test_the_live_server_serves_the_same_spec(live):
    assert httpx.get(live.url + "/openapi.json").json() == create_app(Config()).openapi()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_schemathesis_no_server_errors(case, live):
    response = case.call_and_validate(base_url=live.url, checks=[not_a_server_error],
                                      headers={"Authorization": f"Bearer {live.db.tokens['admin']}"})
    SEEN[f"{case.method} {case.path}"].add(response.status_code)


def test_schemathesis_reached_the_api():
    """The run above got past authentication and validation (not only 401s or 422s)."""
    if not SEEN:
        pytest.skip("run with the schemathesis test")
    codes = Counter(code for seen in SEEN.values() for code in seen)
    print(dict(codes))
    assert 401 not in codes and 500 not in codes
    assert codes[422] and (codes[200] or codes[201])
    created = {op for op, seen in SEEN.items() if 201 in seen}
    assert {"POST /api/v1/sites", "POST /api/v1/runs", "POST /api/v1/tokens"} <= created, created
