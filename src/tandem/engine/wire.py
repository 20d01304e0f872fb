"""The replication wire protocol between the two daemons of a resource.

Every message is a 12-byte header followed by a payload:

    magic u32 | type u16 | flags u16 | payload length u32      (little-endian)

Handshake and state messages carry a small JSON object; the data path uses
fixed binary layouts. The decoder trusts nothing: unknown types, oversized or
short payloads, bad JSON and out-of-range fields raise ProtocolError, and the
caller drops that one connection. Nothing is written before a message has
been fully validated.
"""

from __future__ import annotations

import json
import struct
import zlib
from enum import IntEnum

MAGIC = 0x314D4454            # "TDM1"
VERSION = 3                   # 2: WRITE_ACK is cumulative; 3: nonce + AUTH, health probe, zlib bitmaps
HEADER = struct.Struct("<IHHI")
MAX_DATA = 32 << 20           # largest write or resync block
MAX_JSON = 256 << 10

FLAG_FUA = 1


class ProtocolError(Exception):
    """The peer sent something malformed or hostile: drop the connection."""


class T(IntEnum):
    HELLO = 1          # json: who we are, volumes, generation ids, disk states
    DATA = 2           # volume u16, seq u64, offset u64 + data   (application write)
    WRITE_ACK = 3      # seq u64: every DATA up to seq is applied   (cumulative)
    FLUSH = 4          # id u64: make every earlier write durable
    FLUSH_ACK = 5      # id u64
    RS_DATA = 6        # volume u16, offset u64 + data            (resync block)
    RS_ACK = 7         # volume u16, offset u64, length u32
    STATE = 8          # json: role / disk-state changes, sync start and end
    PING = 9           # id u64
    PING_ACK = 10      # id u64
    BITMAP = 11        # volume u16, first byte u64 + zlib of up to BITMAP_CHUNK bitmap bytes (handshake)
    AUTH = 12          # 32 bytes: HMAC-SHA256 proof of the shared secret (ident stage, auth.py)
    VERIFY_REQ = 13    # id u64, volume u16, offset u64, length u32, block u32 + 16-byte digest per block
    VERIFY_REPLY = 14  # id u64, volume u16, offset u64, length u32, block u32 + mismatch bitmask


_DATA = struct.Struct("<HQQ")
_U64 = struct.Struct("<Q")
_RS_DATA = struct.Struct("<HQ")
_RS_ACK = struct.Struct("<HQI")
_BITMAP = struct.Struct("<HQ")
AUTH_SIZE = 32

_VERIFY = struct.Struct("<QHQII")

#: Online verify (verify.py): largest range per request, digest size, smallest block.
VERIFY_MAX = 1 << 20
VERIFY_DIGEST = 16
VERIFY_MIN_BLOCK = 512

_TYPES = {int(t): t for t in T}          # a dict lookup: calling T(n) is slow
_JSON_TYPES = {T.HELLO, T.STATE}
_U64_TYPES = {T.WRITE_ACK, T.FLUSH, T.FLUSH_ACK, T.PING, T.PING_ACK}
_SMALL_LIMITS = {   # payload limits of the fixed-layout types bigger than 64 bytes
    T.VERIFY_REQ: _VERIFY.size + VERIFY_MAX // VERIFY_MIN_BLOCK * VERIFY_DIGEST,
    T.VERIFY_REPLY: _VERIFY.size + VERIFY_MAX // VERIFY_MIN_BLOCK // 8,
}


class Message:
    """One decoded message; which fields are set depends on the type.

    A plain slotted class: the data path builds one per replicated write, and a
    frozen dataclass costs several times more to construct.
    """

    __slots__ = ("type", "flags", "volume", "seq", "offset", "length", "data", "body",
                 "block_size")      # VERIFY_REQ / VERIFY_REPLY only (set by parse_payload)

    def __init__(self, type: T, flags: int = 0, *, volume: int = 0, seq: int = 0, offset: int = 0,
                 length: int = 0, data: bytes | memoryview = b"", body: dict | None = None):
        self.type, self.flags, self.volume, self.seq = type, flags, volume, seq
        self.offset, self.length, self.data, self.body = offset, length, data, body

    def __repr__(self) -> str:
        return (f"Message({self.type.name}, flags={self.flags}, volume={self.volume}, seq={self.seq}, "
                f"offset={self.offset}, length={self.length})")


# -- encoding (returns a list of buffers for writelines: no payload copy) ----------

def _frame(t: T, payload_len: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, t, flags, payload_len)


def encode_json(t: T, body: dict) -> list[bytes]:
    raw = json.dumps(body, separators=(",", ":")).encode()
    if len(raw) > MAX_JSON:
        raise ValueError(f"{t.name} message too large ({len(raw)} bytes)")
    return [_frame(t, len(raw)), raw]


def encode_u64(t: T, value: int) -> list[bytes]:
    return [_frame(t, 8) + _U64.pack(value)]


_DATA_FRAME = struct.Struct("<IHHI" + _DATA.format.lstrip("<"))   # header + DATA fields, one pack


def encode_data(volume: int, seq: int, offset: int, data: bytes, fua: bool) -> list[bytes]:
    return [_DATA_FRAME.pack(MAGIC, T.DATA, FLAG_FUA if fua else 0, _DATA.size + len(data),
                             volume, seq, offset), data]


def encode_rs_data(volume: int, offset: int, data: bytes) -> list[bytes]:
    return [_frame(T.RS_DATA, _RS_DATA.size + len(data)) + _RS_DATA.pack(volume, offset), data]


def encode_rs_ack(volume: int, offset: int, length: int) -> list[bytes]:
    return [_frame(T.RS_ACK, _RS_ACK.size) + _RS_ACK.pack(volume, offset, length)]


def encode_auth(mac: bytes) -> list[bytes]:
    if len(mac) != AUTH_SIZE:
        raise ValueError(f"AUTH carries {AUTH_SIZE} bytes, got {len(mac)}")
    return [_frame(T.AUTH, AUTH_SIZE) + mac]


def encode_bitmap(volume: int, first_byte: int, chunk: bytes) -> list[bytes]:
    return [_frame(T.BITMAP, _BITMAP.size + len(chunk)) + _BITMAP.pack(volume, first_byte), chunk]


def verify_blocks(length: int, block_size: int) -> int:
    """Blocks (digests, mask bits) in a verify range; the last one may be partial."""
    return -(-length // block_size)


def encode_verify_req(rid: int, volume: int, offset: int, length: int, block_size: int,
                      digests: bytes) -> list[bytes]:
    return [_frame(T.VERIFY_REQ, _VERIFY.size + len(digests))
            + _VERIFY.pack(rid, volume, offset, length, block_size), digests]


def encode_verify_reply(rid: int, volume: int, offset: int, length: int, block_size: int,
                        mask: bytes) -> list[bytes]:
    return [_frame(T.VERIFY_REPLY, _VERIFY.size + len(mask))
            + _VERIFY.pack(rid, volume, offset, length, block_size), mask]


BITMAP_CHUNK = 1 << 20        # raw bitmap bytes per BITMAP message


def pack_bitmap(bitmap: bytes):
    """(first byte, zlib chunk) pairs. A bitmap is mostly zeros, so this keeps the
    state exchange (while the Primary's writes wait) short even for a 1 TiB volume."""
    for i in range(0, len(bitmap), BITMAP_CHUNK):
        yield i, zlib.compress(bitmap[i:i + BITMAP_CHUNK], 1)


def unpack_bitmap(packed, expected: int) -> bytes:
    """Inflate one chunk, which must be exactly `expected` bytes (no zip bombs, no trailing data)."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(packed, expected + 1)
    except zlib.error as e:
        raise ProtocolError(f"BITMAP chunk is not valid zlib: {e}") from None
    if len(raw) != expected or not d.eof or d.unused_data or d.unconsumed_tail:
        raise ProtocolError(f"BITMAP chunk does not inflate to exactly {expected} bytes")
    return raw


# -- decoding --------------------------------------------------------------------

def parse_header(fields: tuple[int, int, int, int]) -> tuple[T, int, int]:
    """Validate an unpacked HEADER; returns (type, flags, payload length)."""
    magic, number, flags, length = fields
    if magic != MAGIC:
        # 0x16 0x03: a TLS handshake record, from a peer that is not in plaintext mode.
        hint = ": a TLS handshake, but this node has security.plaintext" if magic & 0xFFFF == 0x0316 else ""
        raise ProtocolError(f"bad magic {magic:#x}{hint}")
    t = _TYPES.get(number)
    if t is None:
        raise ProtocolError(f"unknown message type {number}")
    limit = MAX_JSON if t in _JSON_TYPES else (
        MAX_DATA + 64 if t in (T.DATA, T.RS_DATA, T.BITMAP) else _SMALL_LIMITS.get(t, 64))
    if length > limit:
        raise ProtocolError(f"{t.name} payload of {length} bytes exceeds {limit}")
    if flags & ~FLAG_FUA or (flags and t != T.DATA):
        raise ProtocolError(f"{t.name} with unknown flags {flags:#x}")
    return t, flags, length


def parse_payload(t: T, flags: int, payload: bytes | bytearray) -> Message:
    """Decode a payload; data fields are zero-copy views of it (do not reuse payload)."""
    if t in _JSON_TYPES:
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"{t.name}: payload is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"{t.name}: payload is not a JSON object")
        return Message(t, body=body)
    if t in _U64_TYPES:
        _exact(t, payload, _U64.size)
        return Message(t, seq=_U64.unpack(payload)[0])
    if t == T.DATA:
        _at_least(t, payload, _DATA.size + 1)
        volume, seq, offset = _DATA.unpack_from(payload)
        data = memoryview(payload)[_DATA.size:]
        return Message(t, flags, volume=volume, seq=seq, offset=offset, length=len(data), data=data)
    if t == T.RS_DATA:
        _at_least(t, payload, _RS_DATA.size + 1)
        volume, offset = _RS_DATA.unpack_from(payload)
        data = memoryview(payload)[_RS_DATA.size:]
        return Message(t, volume=volume, offset=offset, length=len(data), data=data)
    if t == T.RS_ACK:
        _exact(t, payload, _RS_ACK.size)
        volume, offset, length = _RS_ACK.unpack(payload)
        return Message(t, volume=volume, offset=offset, length=length)
    if t == T.AUTH:
        _exact(t, payload, AUTH_SIZE)
        return Message(t, length=AUTH_SIZE, data=bytes(payload))
    if t == T.BITMAP:
        _at_least(t, payload, _BITMAP.size)
        volume, first = _BITMAP.unpack_from(payload)
        return Message(t, volume=volume, offset=first, data=memoryview(payload)[_BITMAP.size:])
    if t in (T.VERIFY_REQ, T.VERIFY_REPLY):
        return _parse_verify(t, payload)
    raise ProtocolError(f"no decoder for {t.name}")    # pragma: no cover - enum is closed


def _parse_verify(t: T, payload) -> Message:
    """VERIFY_REQ / VERIFY_REPLY: the range and block geometry, then exactly the
    digests (one per block) or the mask (one bit per block, unused bits zero).
    Whether the range fits the volume and ends on a block is the receiver's check
    (it knows the size)."""
    _at_least(t, payload, _VERIFY.size)
    rid, volume, offset, length, block = _VERIFY.unpack_from(payload)
    if block < VERIFY_MIN_BLOCK or block > VERIFY_MAX or block & (block - 1):
        raise ProtocolError(f"{t.name}: bad block size {block}")
    if not 0 < length <= VERIFY_MAX:
        raise ProtocolError(f"{t.name}: bad length {length}")
    if offset % block:
        raise ProtocolError(f"{t.name}: offset {offset} is not a multiple of the block size {block}")
    n = verify_blocks(length, block)
    body = memoryview(payload)[_VERIFY.size:]
    if t == T.VERIFY_REQ:
        _exact(t, payload, _VERIFY.size + n * VERIFY_DIGEST)
    else:
        _exact(t, payload, _VERIFY.size + (n + 7) // 8)
        if n & 7 and body[-1] >> (n & 7):
            raise ProtocolError(f"{t.name}: mask bits set past the last block")
    msg = Message(t, volume=volume, seq=rid, offset=offset, length=length, data=body)
    msg.block_size = block
    return msg


def _exact(t: T, payload: bytes, n: int) -> None:
    if len(payload) != n:
        raise ProtocolError(f"{t.name}: payload is {len(payload)} bytes, expected {n}")


def _at_least(t: T, payload: bytes, n: int) -> None:
    if len(payload) < n:
        raise ProtocolError(f"{t.name}: payload is {len(payload)} bytes, expected at least {n}")


def check_range(msg: Message, volume_sizes: list[int]) -> None:
    """A data-path message must name a volume and stay inside it."""
    if msg.volume >= len(volume_sizes):
        raise ProtocolError(f"{msg.type.name}: no volume {msg.volume}")
    size = volume_sizes[msg.volume]
    if msg.offset >= size or msg.length > size - msg.offset:
        raise ProtocolError(f"{msg.type.name}: range {msg.offset}+{msg.length} is outside "
                            f"volume {msg.volume} ({size} bytes)")
