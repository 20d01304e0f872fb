"""tandem_health against real listeners on loopback: a TCP port that opens late, an HTTP
server whose status changes, ping of 127.0.0.1, and the failures with their reasons."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_module_tandem_vm import run  # pytest puts tests/unit on sys.path

from tests.engine.harness import free_port


def health(expect_fail=False, **params):
    return run("tandem_health", expect_fail=expect_fail, diff=False, **params)


def test_tcp_waits_for_a_port_that_opens_late():
    port = free_port()
    srv = socket.socket()

    def open_later():
        time.sleep(1.5)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()

    threading.Thread(target=open_later, daemon=True).start()
    started = time.time()
    try:
        r = health(health_check={"type": "tcp", "host": "{ip}", "port": port}, address="127.0.0.1",
                   timeout=20, interval=0.5, started_at=started - 10)
    finally:
        srv.close()
    assert r["healthy"] and r["attempts"] >= 2 and r["target"] == f"tcp 127.0.0.1:{port}"
    assert r["healthy_after"] >= 11.0                    # counted from started_at, not from the check
    assert "Connection refused" in (r["last_error"] or "")


def test_tcp_times_out_with_the_last_reason():
    port = free_port()
    r = health(expect_fail=True, health_check={"type": "tcp", "port": port}, address="127.0.0.1",
               timeout=1.5, interval=0.5)
    assert not r["healthy"] and r["healthy_at"] is None
    assert "not healthy after 1.5 s" in r["msg"] and "Connection refused" in r["msg"]


@pytest.fixture
def http_server():
    state = {"status": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], state
    srv.shutdown()


def test_http_passes_only_on_an_expected_status(http_server):
    port, state = http_server
    check = {"type": "http", "url": f"http://{{ip}}:{port}/healthz", "expect_status": [200, 204]}
    r = health(expect_fail=True, health_check=check, address="127.0.0.1", timeout=1.2, interval=0.5)
    assert "HTTP 503, expected [200, 204]" in r["msg"]
    threading.Timer(1.0, lambda: state.update(status=204)).start()
    r = health(health_check=check, address="127.0.0.1", timeout=15, interval=0.3)
    assert r["healthy"] and r["target"] == f"http http://127.0.0.1:{port}/healthz"


def test_ping_and_none():
    assert health(health_check={"type": "ping"}, address="127.0.0.1", timeout=10)["healthy"]
    r = health(health_check={"type": "none"}, address="192.0.2.1", timeout=1)
    assert r["healthy"] and r["attempts"] == 1


def test_an_unknown_check_is_a_clear_error():
    r = health(expect_fail=True, health_check={"type": "smtp"}, address="127.0.0.1", timeout=1)
    assert "unknown health check type 'smtp'" in r["msg"]


@pytest.fixture
def netns():
    """A network namespace with only loopback up: nothing outside it is reachable."""
    name = f"tdr-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def health_in_a_process(**params) -> dict:
    """Run the module as Ansible does, in its own process: entering a namespace must not
    move the test process itself."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-c", "local",
         "-m", "tandem.dr.tandem_health", "-a", json.dumps(params)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
             "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
             "ANSIBLE_COLLECTIONS_PATH": str(Path(__file__).resolve().parents[2] / ".cache" / "collections")})
    return json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]


def test_a_check_runs_inside_a_network_namespace(netns):
    port = free_port()
    with socket.socket() as srv:                           # listens in the host's namespace
        srv.bind(("127.0.0.1", port))
        srv.listen()
        assert health_in_a_process(health_check={"type": "tcp", "port": port}, address="127.0.0.1",
                                   timeout=3)["healthy"]
        inside = health_in_a_process(health_check={"type": "tcp", "port": port}, address="127.0.0.1",
                                     timeout=1.5, interval=0.5, netns=netns)
    assert inside["failed"] and "Connection refused" in inside["msg"]   # the namespace's own loopback
    missing = health_in_a_process(health_check={"type": "none"}, address="x", netns="no-such-ns-here")
    assert missing["failed"] and "cannot enter network namespace no-such-ns-here" in missing["msg"]
