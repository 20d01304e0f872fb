"""The peer protocol decoder rejects anything malformed, and never crashes otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine import wire
from tandem.engine.wire import ProtocolError, T


def decode(raw: bytes) -> wire.Message:
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await wire.read_message(reader)
    return asyncio.run(go())


def test_round_trips():
    msg = decode(b"".join(wire.encode_data(1, 7, 4096, b"x" * 512, fua=True)))
    assert (msg.type, msg.volume, msg.seq, msg.offset, msg.data, msg.flags) == \
        (T.DATA, 1, 7, 4096, b"x" * 512, wire.FLAG_FUA)
    assert decode(b"".join(wire.encode_u64(T.WRITE_ACK, 9))).seq == 9
    assert decode(b"".join(wire.encode_json(T.HELLO, {"a": 1}))).body == {"a": 1}
    ack = decode(b"".join(wire.encode_rs_ack(0, 8192, 4096)))
    assert (ack.offset, ack.length) == (8192, 4096)


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<IHHI", 0xDEAD, 2, 0, 0), "bad magic"),
    (struct.pack("<IHHI", wire.MAGIC, 99, 0, 0), "unknown message type"),
    (struct.pack("<IHHI", wire.MAGIC, T.DATA, 0, wire.MAX_DATA + 1000), "exceeds"),
    (struct.pack("<IHHI", wire.MAGIC, T.WRITE_ACK, 0, 4) + b"\0" * 4, "expected 8"),
    (struct.pack("<IHHI", wire.MAGIC, T.WRITE_ACK, 1, 8) + b"\0" * 8, "unknown flags"),
    (struct.pack("<IHHI", wire.MAGIC, T.HELLO, 0, 3) + b"[1]", "not a JSON object"),
    (struct.pack("<IHHI", wire.MAGIC, T.HELLO, 0, 2) + b"\xff\xfe", "not JSON"),
    (struct.pack("<IHHI", wire.MAGIC, T.DATA, 0, 18) + b"\0" * 18, "at least"),
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
    except (ProtocolError, asyncio.IncompleteReadError):
        return
    assert isinstance(msg, wire.Message)


@settings(max_examples=300, deadline=None)
@given(t=st.sampled_from(list(T)), flags=st.integers(0, 3), payload=st.binary(max_size=64))
def test_well_framed_garbage_is_rejected_or_decoded(t, flags, payload):
    raw = struct.pack("<IHHI", wire.MAGIC, t, flags, len(payload)) + payload
    with contextlib.suppress(ProtocolError):
        decode(raw)
