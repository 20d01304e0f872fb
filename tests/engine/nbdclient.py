"""A small blocking NBD client for tests (fixed newstyle, OPT_GO, simple replies).

Deliberately independent of the server code it tests.
"""

from __future__ import annotations

import contextlib
import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FUA = 1


class NBDError(OSError):
    pass


class Client:
    def __init__(self, socket_path: str, export: str = "", timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self._handle = 0
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NBDError("not an NBD newstyle server")
        self.sock.sendall(struct.pack(">I", 3))                     # fixed newstyle, no zeroes
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = None
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.tflags = struct.unpack(">QH", payload[2:12])
            elif rtype & 0x80000000:
                raise NBDError(f"export {export!r} refused: reply type {rtype:#x}")
        if self.size is None:
            raise NBDError("no export info")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _cmd(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
                          + payload)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NBDError("bad reply")
        if error:
            raise NBDError(error, f"NBD error {error}")
        return self._recv(length) if cmd == CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._cmd(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._cmd(CMD_WRITE, offset, len(data), data, FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._cmd(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()
