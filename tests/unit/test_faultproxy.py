"""The fault proxy, over real sockets on 127.0.0.1: forwarding, each fault, and the control channel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import selectors
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tandem.faultproxy import CHUNK, ControlError, FaultProxy, ProxyControl, handle_request

SRC = Path(__file__).resolve().parents[2] / "src"
MiB = 1 << 20


def run(coro, timeout=15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Peer:
    """What the target saw of one connection."""

    def __init__(self):
        self.received = bytearray()
        self.end: str | None = None          # "eof" or "reset"
        self.done = asyncio.Event()


class Target:
    """The server behind the proxy.

    With no payload it echoes; with one it sends the payload, then EOF, while taking in everything
    the client sends. With `paused` set it reads nothing until `resume()`.
    """

    def __init__(self, payload: bytes | None = None, paused: bool = False):
        self.payload = payload
        self.peers: list[Peer] = []
        self.reading = asyncio.Event()
        if not paused:
            self.reading.set()

    async def start(self) -> Target:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=CHUNK)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = Peer()
        self.peers.append(peer)
        try:
            await self.reading.wait()
            if self.payload is None:
                while data := await r.read(CHUNK):
                    peer.received += data
                    w.write(data)
                    await w.drain()
                w.write_eof()
            else:
                async def send():
                    w.write(self.payload)
                    await w.drain()
                    w.write_eof()

                async def take():
                    while data := await r.read(CHUNK):
                        peer.received += data

                await asyncio.gather(send(), take())
            peer.end = "eof"
        except ConnectionResetError:
            peer.end = "reset"
        finally:
            w.close()
            peer.done.set()

    def close(self) -> None:
        self.server.close()


async def proxy_to(target: Target, **faults) -> FaultProxy:
    proxy = FaultProxy("127.0.0.1", 0, "127.0.0.1", target.port, seed=1)
    await proxy.start()
    proxy.set(**faults)
    return proxy


async def connect(proxy: FaultProxy):
    return await asyncio.open_connection("127.0.0.1", proxy.port, limit=CHUNK)


async def rtt(r: asyncio.StreamReader, w: asyncio.StreamWriter, msg: bytes = b"ping") -> float:
    t0 = time.monotonic()
    w.write(msg)
    assert await asyncio.wait_for(r.readexactly(len(msg)), 5) == msg
    return time.monotonic() - t0


async def until(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- forwarding ----------------------------------------------------------------

@pytest.mark.parametrize("faults", [{}, {"delay": 0.01, "jitter": 0.02}], ids=["plain", "delay-jitter"])
def test_forwards_byte_exact_both_ways(faults):
    up, down = os.urandom(8 * MiB), os.urandom(8 * MiB)

    async def go():
        target = await Target(payload=down).start()
        proxy = await proxy_to(target, **faults)
        r, w = await connect(proxy)

        async def send():
            w.write(up)
            await w.drain()
            w.write_eof()

        got, _sent = await asyncio.gather(r.read(-1), send())   # read(-1): everything up to EOF
        await target.peers[0].done.wait()
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        assert hashlib.sha256(target.peers[0].received).digest() == hashlib.sha256(up).digest()
        assert target.peers[0].end == "eof"
        w.close()
        await until(lambda: proxy.stats()["active"] == 0)
        stats = proxy.stats()
        assert (stats["bytes_to_target"], stats["bytes_to_client"]) == (len(up), len(down))
        assert (stats["accepted"], stats["bytes_discarded"]) == (1, 0)
        await proxy.stop()
        target.close()

    run(go())


def test_jitter_keeps_small_messages_in_order():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target, jitter=0.05)
        r, w = await connect(proxy)
        msgs = [b"%05d;" % i for i in range(300)]
        for m in msgs:                      # separate reads at the proxy, each with its own jitter draw
            w.write(m)
            await asyncio.sleep(0.0005)
        got = await asyncio.wait_for(r.readexactly(sum(map(len, msgs))), 5)
        assert got == b"".join(msgs)
        w.close()
        await proxy.stop()
        target.close()

    run(go())


def test_source_back_pressure_bounds_buffering():
    """A target that does not read stops the sender; nothing is lost once it reads again."""

    async def go():
        target = await Target(payload=b"", paused=True).start()
        proxy = await proxy_to(target)
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.setblocking(False)
        block = os.urandom(MiB)
        sent, last = bytearray(), time.monotonic()
        while time.monotonic() - last < 0.3 and len(sent) < 256 * MiB:
            try:
                n = s.send(block)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            sent += block[:n]
            last = time.monotonic()
        # Kernel buffers on both sides of the proxy, plus the proxy's own ~2.5 MiB: far from 256 MiB.
        assert len(sent) < 64 * MiB
        await until(lambda: target.peers)
        target.reading.set()
        s.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(target.peers[0].done.wait(), 10)
        assert target.peers[0].received == sent
        s.close()
        await proxy.stop()
        target.close()

    run(go())


# -- faults --------------------------------------------------------------------

def test_delay_adds_latency_to_an_open_connection():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target)
        r, w = await connect(proxy)
        await rtt(r, w)
        proxy.set(delay=0.1)                # applies to the connection already open
        assert await rtt(r, w) >= 2 * 0.1 - 0.001      # once each way
        proxy.set(delay=0.05, jitter=0.05)
        assert await rtt(r, w) >= 2 * 0.05 - 0.001
        w.close()
        await proxy.stop()
        target.close()

    run(go())


def test_blackhole_discards_silently_and_keeps_connections_open():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target)
        r, w = await connect(proxy)
        await rtt(r, w, b"before")
        proxy.set(blackhole=True)
        w.write(b"lost")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.read(100), 0.3)
        # A new connection is still accepted and connected to the target, and hears nothing either.
        r2, w2 = await connect(proxy)
        await until(lambda: len(target.peers) == 2)
        w2.write(b"lost too")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r2.read(100), 0.3)
        assert proxy.stats()["bytes_discarded"] == len(b"lost") + len(b"lost too")
        assert target.peers[0].received == b"before" and target.peers[1].received == b""

        proxy.set(blackhole=False)          # only new bytes flow again
        assert await rtt(r, w, b"after") >= 0
        assert await rtt(r2, w2, b"after2") >= 0
        assert target.peers[0].received == b"beforeafter"
        assert target.peers[1].received == b"after2"
        assert all(p.end is None for p in target.peers)
        for writer in (w, w2):
            writer.close()
        await proxy.stop()
        target.close()

    run(go())


def test_down_closes_open_and_new_connections():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target)
        r, w = await connect(proxy)
        await rtt(r, w)
        proxy.set(down=True)
        assert await asyncio.wait_for(r.read(100), 5) == b""        # FIN, not RST
        await asyncio.wait_for(target.peers[0].done.wait(), 5)
        assert target.peers[0].end == "eof"
        w.close()

        r2, w2 = await connect(proxy)       # accepted by the kernel, then closed by the proxy
        assert await asyncio.wait_for(r2.read(100), 5) == b""
        w2.close()
        assert len(target.peers) == 1
        assert proxy.stats()["refused"] == 1

        proxy.set(down=False)
        r3, w3 = await connect(proxy)
        await rtt(r3, w3)
        w3.close()
        await proxy.stop()
        target.close()

    run(go())


def test_reset_aborts_with_rst_on_both_sides():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target)
        r, w = await connect(proxy)
        await rtt(r, w)
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(100), 5)
        await asyncio.wait_for(target.peers[0].done.wait(), 5)
        assert target.peers[0].end == "reset"
        w.close()
        await until(lambda: proxy.stats()["active"] == 0)

        r2, w2 = await connect(proxy)       # an action, not a state: new connections work
        await rtt(r2, w2)
        w2.close()
        await proxy.stop()
        target.close()

    run(go())


def test_peer_reset_is_passed_on():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target)
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(b"x")
        await until(lambda: target.peers and target.peers[0].received == b"x")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()                           # RST from the client
        await asyncio.wait_for(target.peers[0].done.wait(), 5)
        assert target.peers[0].end == "reset"
        await proxy.stop()
        target.close()

    run(go())


def test_rate_caps_bandwidth():
    async def go():
        target = await Target(payload=b"").start()
        proxy = await proxy_to(target, rate=2 * MiB)
        r, w = await connect(proxy)
        t0 = time.monotonic()
        w.write(os.urandom(MiB))
        w.write_eof()
        await until(lambda: target.peers)
        await asyncio.wait_for(target.peers[0].done.wait(), 10)
        elapsed = time.monotonic() - t0
        assert len(target.peers[0].received) == MiB
        assert elapsed >= 0.4               # 1 MiB at 2 MiB/s, less one 50 ms burst
        w.close()
        await proxy.stop()
        target.close()

    run(go())


def test_drop_one_refuses_every_connection():
    async def go():
        target = await Target().start()
        proxy = await proxy_to(target, drop=1.0)
        for _attempt in range(5):
            r, w = await connect(proxy)
            assert await asyncio.wait_for(r.read(100), 5) == b""
            w.close()
        assert target.peers == []
        stats = proxy.stats()
        assert (stats["accepted"], stats["refused"], stats["active"]) == (5, 5, 0)
        proxy.set(drop=0.0)
        r, w = await connect(proxy)
        await rtt(r, w)
        w.close()
        await proxy.stop()
        target.close()

    run(go())


# -- requests --------------------------------------------------------------------

@pytest.mark.parametrize("request_, error", [
    ({"op": "set", "delay": -1}, "delay must be a finite number >= 0"),
    ({"op": "set", "delay": "0.1"}, "delay must be a finite number"),
    ({"op": "set", "rate": True}, "rate must be a finite number"),
    ({"op": "set", "jitter": float("nan")}, "jitter must be a finite number"),
    ({"op": "set", "drop": 1.5}, "drop is a probability"),
    ({"op": "set", "blackhole": 1}, "blackhole must be true or false"),
    ({"op": "set", "latency": 0.1}, "unknown fault 'latency'"),
    ({"op": "set"}, "set needs at least one fault"),
    ({"op": "reset", "delay": 0}, "reset takes no arguments"),
    ({"op": "pause"}, "unknown op 'pause'"),
    ({"delay": 0.1}, "unknown op None"),
    ([1, 2], "a request is a JSON object"),
])
def test_bad_requests_are_refused(request_, error):
    proxy = FaultProxy("127.0.0.1", 0, "127.0.0.1", 1)
    reply = handle_request(proxy, request_)
    assert reply["ok"] is False and error in reply["error"]
    assert proxy.stats()["faults"] == FaultProxy("h", 0, "h", 1).stats()["faults"]


def test_set_is_all_or_nothing():
    proxy = FaultProxy("127.0.0.1", 0, "127.0.0.1", 1)
    with pytest.raises(ValueError):
        proxy.set(delay=0.1, drop=2)
    assert proxy.faults.delay == 0.0
    assert proxy.set(delay=0.1, rate=1000)["rate"] == 1000.0
    assert proxy.clear() == {"delay": 0.0, "jitter": 0.0, "rate": 0.0, "blackhole": False,
                             "down": False, "drop": 0.0}


# -- as a separate process -------------------------------------------------------

class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        with self.request:
            try:
                while data := self.request.recv(65536):
                    self.request.sendall(data)
            except ConnectionResetError:
                pass


def _sync_rtt(s: socket.socket, msg: bytes = b"ping") -> float:
    t0 = time.monotonic()
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(100)
        assert chunk, "connection closed"
        got += chunk
    assert got == msg
    return time.monotonic() - t0


@pytest.fixture
def echo_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_subprocess_with_control_socket(echo_server, tmp_path):
    ctl_path = tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.faultproxy", "--listen", "127.0.0.1:0",
         "--target", f"127.0.0.1:{echo_server}", "--control", str(ctl_path)],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(10), "the proxy printed no port line"
        port = json.loads(proc.stdout.readline())["port"]
        ctl = ProxyControl(str(ctl_path))

        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        _sync_rtt(s)
        assert ctl.set(delay=0.05)["delay"] == 0.05
        assert _sync_rtt(s) >= 2 * 0.05 - 0.001

        # Bad requests get ok: false and leave the proxy working.
        assert ctl.request({"op": "set", "delay": -1})["ok"] is False
        with pytest.raises(ControlError, match="unknown fault"):
            ctl.set(bogus=1)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(5)
            raw.connect(str(ctl_path))
            raw.sendall(b"not json\n{\"op\": \"stats\"}\n")
            with raw.makefile("rb") as replies:
                bad, good = json.loads(replies.readline()), json.loads(replies.readline())
        assert bad["ok"] is False and "not JSON" in bad["error"]
        assert good["ok"] is True     # the same control connection goes on after a bad line
        assert _sync_rtt(s) >= 0.1 - 0.001

        stats = ctl.stats()
        assert stats["active"] == 1 and stats["accepted"] == 1 and stats["faults"]["delay"] == 0.05
        assert stats["bytes_to_target"] == stats["bytes_to_client"] == 3 * len(b"ping")
        assert ctl.clear()["delay"] == 0.0

        assert ctl.reset() == 1
        with pytest.raises(ConnectionResetError):
            s.recv(100)
        s.close()
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        _sync_rtt(s)
        s.close()

        proc.terminate()
        assert proc.wait(10) == 0
        assert not ctl_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
