"""link.py over real TLS (certificates from certs.py), in one process: decoding, flow control,
coalesced sends, the handshake timeout, and bytes that arrive with the client's Finished."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest

from tandem.engine import security, wire
from tandem.engine.auth import AuthError
from tandem.engine.config import parse_resource
from tandem.engine.link import BIG, MAX_HANDSHAKES, TLS, Link, connect, listen

from .certs import pki, write_secret


def contexts(tmp_path, client_cert=("site-a", "a")) -> tuple[TLS, TLS]:
    """(client, server) TLS for node a dialing node b, built the way tandemd builds them."""
    p = pki()
    a, b = p.issue(*client_cert), p.issue("site-b", "b")
    write_secret(tmp_path / "s.key")
    doc = {"resource": "vm1", "protocol": "C", "local_node": "a",
           "nodes": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2"}],
           "volumes": [{"number": 0, "path": "/x", "size": 4096}],
           "security": {"tls_cert": str(a.cert), "tls_key": str(a.key), "tls_ca": str(p.ca("site-b").cert),
                        "secret_file": str(tmp_path / "s.key")}}
    client = security.load(parse_resource(doc)).client_tls
    doc.update(local_node="b", security={**doc["security"], "tls_cert": str(b.cert), "tls_key": str(b.key),
                                          "tls_ca": str(p.ca("site-a").cert)})
    server = security.load(parse_resource(doc)).server_tls
    return client, server


async def pair(client_tls: TLS, server_tls: TLS, errors: list | None = None) -> tuple[Link, Link, object]:
    accepted: asyncio.Queue = asyncio.Queue()
    on_error = (lambda link, exc: errors.append(exc)) if errors is not None else None
    server = await listen("127.0.0.1", 0, accepted.put_nowait, on_error, lambda: server_tls)
    port = server.sockets[0].getsockname()[1]
    client = await connect("127.0.0.1", port, 5, on_error, client_tls)
    return client, await asyncio.wait_for(accepted.get(), 5), server


def stream() -> tuple[list[list[bytes]], list[tuple]]:
    big = bytes(range(256)) * ((3 * BIG) // 256)
    msgs, expect = [], []
    for i in range(300):
        if i % 3 == 1:                     # 100 of them: 19 MiB, more than the socket buffers hold
            msgs.append(wire.encode_rs_data(0, i * 4096, big))
            expect.append((wire.T.RS_DATA, i * 4096, big))
        else:
            data = bytes([i % 256]) * 4096
            msgs.append(wire.encode_data(0, i, i * 4096, data, fua=False))
            expect.append((wire.T.DATA, i * 4096, data))
    return msgs, expect


def test_messages_cross_tls_intact_with_reading_paused_and_resumed(tmp_path):
    client_tls, server_tls = contexts(tmp_path)

    async def go():
        client, server_link, server = await pair(client_tls, server_tls)
        assert client.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert server_link.transport.get_extra_info("peercert")["subjectAltName"] == (("DNS", "a"),)
        got = []
        server_link.pause_reading()

        def on_messages(batch):
            got.extend((m.type, m.offset, bytes(m.data)) for m in batch)

        server_link.start_dispatch(on_messages)
        msgs, expect = stream()
        # The reader is paused, so the sender fills the buffers and is told to wait. (Over TLS
        # it hears so one send late: asyncio's ssl transport passes a send to the socket
        # transport whole and pauses the writer only on the next one.)
        sent = 0
        while not client._write_paused:
            assert sent < len(msgs), "the sender was never paused"
            client.send(msgs[sent])
            sent += 1
            await asyncio.sleep(0.001)
        assert not got
        assert sent < len(msgs) // 2, sent
        server_link.resume_reading()
        for m in msgs[sent:]:
            client.send(m)                  # in one loop iteration: coalesced
        await asyncio.wait_for(client.drain(), 10)
        for _ in range(500):
            if len(got) == len(expect):
                break
            await asyncio.sleep(0.01)
        assert got == expect
        client.close()
        server.close()

    asyncio.run(go())


def test_a_client_certificate_for_another_node_is_refused(tmp_path):
    client_tls, server_tls = contexts(tmp_path, client_cert=("site-a", "c"))

    async def go():
        errors: list = []
        accepted: asyncio.Queue = asyncio.Queue()
        server = await listen("127.0.0.1", 0, accepted.put_nowait, lambda _l, e: errors.append(e),
                              lambda: server_tls)
        port = server.sockets[0].getsockname()[1]
        client = await connect("127.0.0.1", port, 5, None, client_tls)
        with pytest.raises(Exception):      # noqa: B017 - closed on us, however it shows
            await client.read_message(5)
        assert accepted.empty()
        assert [type(e) for e in errors] == [AuthError]
        assert "its certificate is for ['c'], not for 'a'" in str(errors[0])
        server.close()

    asyncio.run(go())


def test_a_connection_that_never_handshakes_is_dropped(tmp_path):
    _, server_tls = contexts(tmp_path)
    quick = TLS(server_tls.context, server_tls.peer_name, handshake_timeout=0.3)

    async def go():
        accepted: asyncio.Queue = asyncio.Queue()
        server = await listen("127.0.0.1", 0, accepted.put_nowait, None, lambda: quick)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 3) == b""      # closed after ~0.3 s
        writer.close()
        assert accepted.empty()
        server.close()

    asyncio.run(go())


def test_stray_connections_cannot_pile_up(tmp_path):
    """At most MAX_HANDSHAKES at once, each for at most handshake_timeout; then the peer gets in."""
    client_tls, server_tls = contexts(tmp_path)
    quick = TLS(server_tls.context, server_tls.peer_name, handshake_timeout=0.5)

    async def go():
        accepted: asyncio.Queue = asyncio.Queue()
        server = await listen("127.0.0.1", 0, accepted.put_nowait, None, lambda: quick)
        port = server.sockets[0].getsockname()[1]
        strays = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_HANDSHAKES)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 0.3) == b""    # one too many: dropped at once
        writer.close()
        for reader, writer in strays:
            assert await asyncio.wait_for(reader.read(), 3) == b""  # each after its timeout
            writer.close()
        client = await connect("127.0.0.1", port, 5, None, client_tls)
        assert (await asyncio.wait_for(accepted.get(), 5)).transport is not None
        client.close()
        server.close()

    asyncio.run(go())


def test_bytes_that_arrive_with_the_handshake_reach_the_link(tmp_path, monkeypatch):
    """The client's Finished and its first message in one TCP segment: kept, not lost."""
    fed = []
    feed = Link._feed
    monkeypatch.setattr(Link, "_feed", lambda self, data: (fed.append(bytes(data)), feed(self, data)))
    p = pki()
    a = p.issue("site-a", "a")
    _, server_tls = contexts(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.load_verify_locations(p.ca("site-b").cert)
    hello = b"".join(wire.encode_json(wire.T.HELLO, {"hi": 1}))

    def client(port: int) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="b")
        with socket.create_connection(("127.0.0.1", port)) as s:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        s.sendall(outgoing.read())
                    incoming.write(s.recv(65536))
            tls.write(hello)
            s.sendall(outgoing.read())      # Finished + HELLO, one write
            s.recv(1)                       # until the server closes

    async def go():
        accepted: asyncio.Queue = asyncio.Queue()
        server = await listen("127.0.0.1", 0, accepted.put_nowait, None, lambda: server_tls)
        port = server.sockets[0].getsockname()[1]
        thread = threading.Thread(target=client, args=(port,))
        thread.start()
        link = await asyncio.wait_for(accepted.get(), 5)
        msg = await link.read_message(5)
        assert (msg.type, msg.body) == (wire.T.HELLO, {"hi": 1})
        assert fed == [hello]               # it came the early way
        link.close()
        await asyncio.to_thread(thread.join, 5)
        server.close()

    asyncio.run(go())
