"""Alert sinks (tandem.center.sinks) against real local receivers: an HTTP server that fails
the first attempts (the webhook retries), one that never answers (the timeout, and the
monitor is not held up), and a UDP syslog socket."""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tandem.center.config import AlertsConfig
from tandem.center.sinks import Notifier

ALERT = {"id": 7, "dedup_key": "engine:a:vm1:degraded", "kind": "degraded", "severity": "critical",
         "subject": "replication degraded", "details": {"kind": "peer-gone"}}


def http_receiver(fail_first: int = 0, hang: bool = False):
    received, attempts = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            attempts.append(1)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if hang:
                time.sleep(5)
            if len(attempts) <= fail_first:
                self.send_response(500)
            else:
                received.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/", received, attempts


async def deliver(cfg: AlertsConfig, events, wait: float) -> float:
    n = Notifier(cfg)
    n.start()
    t0 = time.monotonic()
    for event in events:
        n.notify(event, ALERT)
    took = time.monotonic() - t0                 # notify only queues
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not n.queue.empty():
        await asyncio.sleep(0.05)
    await asyncio.sleep(wait / 4)
    await n.close()
    return took


def test_webhook_retries_then_delivers_raised_and_cleared():
    server, url, received, attempts = http_receiver(fail_first=2)
    try:
        asyncio.run(deliver(AlertsConfig(webhook_url=url, webhook_timeout=2.0, webhook_retries=3),
                            ["raised", "cleared"], wait=6))
    finally:
        server.shutdown()
    assert [r["event"] for r in received] == ["raised", "cleared"]
    assert len(attempts) == 4                      # two refused, then one each
    assert received[0]["alert"] == ALERT and received[0]["source"] == "tandem-center"


def test_a_hanging_webhook_times_out_without_blocking_notify():
    server, url, received, attempts = http_receiver(hang=True)
    try:
        took = asyncio.run(deliver(AlertsConfig(webhook_url=url, webhook_timeout=0.5, webhook_retries=1),
                                   ["raised"] * 50, wait=2))
    finally:
        server.shutdown()
    assert took < 0.5 and received == []


def test_syslog_over_udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    try:
        asyncio.run(deliver(AlertsConfig(syslog_address=f"127.0.0.1:{sock.getsockname()[1]}",
                                         syslog_facility="local0"), ["raised", "cleared"], wait=1))
        first, second = (sock.recv(65536).decode().rstrip("\x00") for _ in range(2))
    finally:
        sock.close()
    # <PRI>: local0 (16) * 8 + crit (2) = 130 for the raise, + info (6) = 134 for the recovery
    assert first.startswith("<130>tandem-center: ") and second.startswith("<134>tandem-center: ")
    assert json.loads(first.split(": ", 1)[1])["alert"]["dedup_key"] == ALERT["dedup_key"]
    assert json.loads(second.split(": ", 1)[1])["event"] == "cleared"
