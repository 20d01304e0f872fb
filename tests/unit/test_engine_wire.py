"""The peer protocol decoder rejects anything malformed, and never crashes otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine import wire
from tandem.engine.link import BIG, Link, LinkClosed
from tandem.engine.wire import ProtocolError, T


def decode_all(pieces: list[bytes]) -> list[wire.Message]:
    """What a real Link makes of these bytes, sent in these pieces over a socket pair.

    Raises the ProtocolError that ended the link, if one did.
    """
    async def go():
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(Link, sock=ours)
        for piece in pieces:
            await loop.sock_sendall(theirs, piece)
            await asyncio.sleep(0.001)         # let the link take each piece on its own
        theirs.shutdown(socket.SHUT_WR)
        msgs = []
        try:
            while True:
                msgs.append(await link.read_message(5))
        except LinkClosed:
            return msgs
        finally:
            link.close()
            theirs.close()
    return asyncio.run(go())


def decode(raw: bytes) -> wire.Message:
    msgs = decode_all([raw])
    if not msgs:
        raise LinkClosed("incomplete")
    return msgs[0]


def test_round_trips():
    msg = decode(b"".join(wire.encode_data(1, 7, 4096, b"x" * 512, fua=True)))
    assert (msg.type, msg.volume, msg.seq, msg.offset, msg.data, msg.flags) == \
        (T.DATA, 1, 7, 4096, b"x" * 512, wire.FLAG_FUA)
    assert decode(b"".join(wire.encode_u64(T.WRITE_ACK, 9))).seq == 9
    assert decode(b"".join(wire.encode_json(T.HELLO, {"a": 1}))).body == {"a": 1}
    ack = decode(b"".join(wire.encode_rs_ack(0, 8192, 4096)))
    assert (ack.offset, ack.length) == (8192, 4096)
    proof = bytes(range(32))
    auth = decode(b"".join(wire.encode_auth(proof)))
    assert (auth.type, auth.data, auth.length) == (T.AUTH, proof, 32)
    with pytest.raises(ValueError, match="32 bytes"):
        wire.encode_auth(proof[:31])


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<IHHI", 0xDEAD, 2, 0, 0), "bad magic"),
    (struct.pack("<IHHI", wire.MAGIC, 99, 0, 0), "unknown message type"),
    (struct.pack("<IHHI", wire.MAGIC, T.DATA, 0, wire.MAX_DATA + 1000), "exceeds"),
    (struct.pack("<IHHI", wire.MAGIC, T.WRITE_ACK, 0, 4) + b"\0" * 4, "expected 8"),
    (struct.pack("<IHHI", wire.MAGIC, T.WRITE_ACK, 1, 8) + b"\0" * 8, "unknown flags"),
    (struct.pack("<IHHI", wire.MAGIC, T.HELLO, 0, 3) + b"[1]", "not a JSON object"),
    (struct.pack("<IHHI", wire.MAGIC, T.HELLO, 0, 2) + b"\xff\xfe", "not JSON"),
    (struct.pack("<IHHI", wire.MAGIC, T.DATA, 0, 18) + b"\0" * 18, "at least"),
    (struct.pack("<IHHI", wire.MAGIC, T.AUTH, 0, 31) + b"\0" * 31, "expected 32"),
    (struct.pack("<IHHI", wire.MAGIC, T.AUTH, 0, 33) + b"\0" * 33, "expected 32"),
    (struct.pack("<IHHI", wire.MAGIC, T.AUTH, 0, 65) + b"\0" * 65, "exceeds"),
    (struct.pack("<IHHI", wire.MAGIC, T.AUTH, 1, 32) + b"\0" * 32, "unknown flags"),
])
def test_malformed_messages_are_rejected(raw, message):
    with pytest.raises(ProtocolError, match=message):
        decode(raw)


def test_range_checks():
    msg = decode(b"".join(wire.encode_data(0, 1, 8192, b"x" * 4096, fua=False)))
    wire.check_range(msg, [12288])
    with pytest.raises(ProtocolError, match="outside"):
        wire.check_range(msg, [8192])
    with pytest.raises(ProtocolError, match="no volume"):
        wire.check_range(decode(b"".join(wire.encode_data(3, 1, 0, b"x", fua=False))), [8192])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(raw):
    try:
        msg = decode(raw)
    except (ProtocolError, LinkClosed):
        return
    assert isinstance(msg, wire.Message)


@settings(max_examples=300, deadline=None)
@given(t=st.sampled_from(list(T)), flags=st.integers(0, 3), payload=st.binary(max_size=64))
def test_well_framed_garbage_is_rejected_or_decoded(t, flags, payload):
    raw = struct.pack("<IHHI", wire.MAGIC, t, flags, len(payload)) + payload
    with contextlib.suppress(ProtocolError, LinkClosed):
        decode(raw)


def _stream() -> tuple[bytes, list[tuple]]:
    """Small and big messages back to back, and what each must decode to."""
    big = bytes(range(256)) * ((BIG + 5000) // 256)
    parts = [wire.encode_data(0, 1, 0, b"a" * 4096, fua=False),
             wire.encode_rs_data(1, 1 << 20, big),
             wire.encode_u64(T.WRITE_ACK, 7),
             wire.encode_data(0, 2, 8192, big[:BIG + 1], fua=True),
             wire.encode_json(T.STATE, {"role": "Primary"})]
    expect = [(T.DATA, 0, 0, b"a" * 4096), (T.RS_DATA, 1, 1 << 20, big), (T.WRITE_ACK, 0, 0, b""),
              (T.DATA, 0, 8192, big[:BIG + 1]), (T.STATE, 0, 0, b"")]
    return b"".join(b"".join(p) for p in parts), expect


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=3 * BIG), max_size=12))
def test_any_split_of_the_stream_decodes_the_same(cuts):
    raw, expect = _stream()
    points = sorted({c for c in cuts if c < len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    msgs = decode_all(pieces)
    assert [(m.type, m.volume, m.offset, bytes(m.data)) for m in msgs] == expect
    assert msgs[3].flags == wire.FLAG_FUA and msgs[4].body == {"role": "Primary"}


def test_garbage_after_good_messages_ends_the_link():
    raw, _ = _stream()
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_all([raw, b"\0" * 64])


# -- compressed bitmaps (the state exchange) ---------------------------------------------

def test_bitmap_chunks_roundtrip_and_shrink():
    bitmap = bytearray(3 * wire.BITMAP_CHUNK + 123)
    bitmap[5] = 0xFF
    bitmap[-1] = 0x01
    chunks = list(wire.pack_bitmap(bytes(bitmap)))
    assert [off for off, _ in chunks] == [0, wire.BITMAP_CHUNK, 2 * wire.BITMAP_CHUNK, 3 * wire.BITMAP_CHUNK]
    assert sum(len(c) for _, c in chunks) < 16 * 1024          # mostly zeros: tiny on the wire
    out = b"".join(wire.unpack_bitmap(c, min(wire.BITMAP_CHUNK, len(bitmap) - off)) for off, c in chunks)
    assert out == bytes(bitmap)


@pytest.mark.parametrize("packed, expected", [
    (zlib.compress(bytes(100 << 20)), wire.BITMAP_CHUNK),      # inflates far beyond the chunk: a bomb
    (zlib.compress(bytes(10)), 11),                             # short
    (zlib.compress(bytes(10)) + b"x", 10),                      # trailing garbage
    (zlib.compress(bytes(10))[:-3], 10),                        # truncated stream
    (b"not zlib at all", 10),
])
def test_hostile_bitmap_chunks_are_protocol_errors(packed, expected):
    with pytest.raises(wire.ProtocolError):
        wire.unpack_bitmap(packed, expected)


# -- online verify (VERIFY_REQ / VERIFY_REPLY) -------------------------------------------

_VERIFY = struct.Struct("<QHQII")


def _verify_raw(t: T, fields: tuple, body: bytes) -> bytes:
    payload = _VERIFY.pack(*fields) + body
    return struct.pack("<IHHI", wire.MAGIC, t, 0, len(payload)) + payload


def test_verify_messages_round_trip():
    digests = bytes(range(16)) * 256                          # 1 MiB in 4 KiB blocks
    req = decode(b"".join(wire.encode_verify_req(5, 1, 1 << 20, 1 << 20, 4096, digests)))
    assert (req.type, req.seq, req.volume, req.offset, req.length, req.block_size, bytes(req.data)) == \
        (T.VERIFY_REQ, 5, 1, 1 << 20, 1 << 20, 4096, digests)
    mask = bytes([0b101]) + bytes(31)
    rep = decode(b"".join(wire.encode_verify_reply(5, 1, 1 << 20, 1 << 20, 4096, mask)))
    assert (rep.type, rep.seq, rep.volume, rep.offset, rep.length, rep.block_size, bytes(rep.data)) == \
        (T.VERIFY_REPLY, 5, 1, 1 << 20, 1 << 20, 4096, mask)
    # A partial last block (a volume that ends inside a block) counts as one block.
    assert wire.verify_blocks(4096 * 3 + 512, 4096) == 4
    tail = decode(b"".join(wire.encode_verify_reply(6, 0, 8192, 4096 + 512, 4096, b"\x02")))
    assert (tail.length, bytes(tail.data)) == (4608, b"\x02")
    # The smallest block size makes the biggest request; it still fits the limits.
    big = decode(b"".join(wire.encode_verify_req(7, 0, 0, 1 << 20, 512, bytes(16 * 2048))))
    assert len(big.data) == 16 * 2048
    assert len(decode(b"".join(wire.encode_verify_reply(7, 0, 0, 1 << 20, 512, bytes(256)))).data) == 256


@pytest.mark.parametrize("t, fields, body, message", [
    (T.VERIFY_REQ, (1, 0, 0, 8192, 4096), bytes(16), "expected 58"),            # one digest short
    (T.VERIFY_REQ, (1, 0, 0, 8192, 4096), bytes(48), "expected 58"),            # one too many
    (T.VERIFY_REQ, (1, 0, 0, 0, 4096), b"", "bad length"),
    (T.VERIFY_REQ, (1, 0, 0, (1 << 20) + 4096, 4096), bytes(16 * 257), "exceeds|bad length"),
    (T.VERIFY_REQ, (1, 0, 0, 4096, 3000), bytes(32), "bad block size"),           # not a power of two
    (T.VERIFY_REQ, (1, 0, 0, 4096, 256), bytes(256), "bad block size"),           # too small
    (T.VERIFY_REQ, (1, 0, 0, 4096, 2 << 20), bytes(16), "bad block size"),        # too big
    (T.VERIFY_REQ, (1, 0, 512, 4096, 4096), bytes(16), "not a multiple"),
    (T.VERIFY_REPLY, (1, 0, 0, 8192, 4096), b"", "expected 27"),
    (T.VERIFY_REPLY, (1, 0, 0, 8192, 4096), b"\x01\x00", "expected 27"),
    (T.VERIFY_REPLY, (1, 0, 0, 8192, 4096), b"\x04", "past the last block"),
    (T.VERIFY_REPLY, (1, 0, 0, 4096, 4096), b"\x80", "past the last block"),
])
def test_malformed_verify_messages_are_rejected(t, fields, body, message):
    with pytest.raises(ProtocolError, match=message):
        decode(_verify_raw(t, fields, body))


def test_verify_header_is_checked_too():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(struct.pack("<IHHI", wire.MAGIC, T.VERIFY_REQ, 0, 1 << 20))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(struct.pack("<IHHI", wire.MAGIC, T.VERIFY_REPLY, 0, 4096))
    with pytest.raises(ProtocolError, match="unknown flags"):
        decode(_verify_raw(T.VERIFY_REPLY, (1, 0, 0, 4096, 4096), b"\x01").replace(
            struct.pack("<HH", T.VERIFY_REPLY, 0), struct.pack("<HH", T.VERIFY_REPLY, 1), 1))
    with pytest.raises(ProtocolError, match="expected at least"):
        decode(struct.pack("<IHHI", wire.MAGIC, T.VERIFY_REQ, 0, 10) + bytes(10))


@settings(max_examples=200, deadline=None)
@given(t=st.sampled_from([T.VERIFY_REQ, T.VERIFY_REPLY]), payload=st.binary(min_size=26, max_size=120))
def test_verify_garbage_is_rejected_or_consistent(t, payload):
    raw = struct.pack("<IHHI", wire.MAGIC, t, 0, len(payload)) + payload
    try:
        msg = decode(raw)
    except (ProtocolError, LinkClosed):
        return
    n = wire.verify_blocks(msg.length, msg.block_size)
    assert len(msg.data) == (n * 16 if t == T.VERIFY_REQ else (n + 7) // 8)
