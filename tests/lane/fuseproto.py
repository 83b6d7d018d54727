"""A minimal FUSE client for driving the lane without a mount: crafted kernel messages over a
SOCK_SEQPACKET socketpair (one message per read and per write, like /dev/fuse). Every lane
thread reads the same socket, as every /dev/fuse fd of one connection shares one queue."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading

IN_HDR = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HDR = struct.Struct("<IiQ")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN
FALLOC_IN = struct.Struct("<QQQII")  # fh offset length mode padding
FILE_INO = 2
ROOT_INO = 1

OP = {"LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "SETATTR": 4, "OPEN": 14, "READ": 15, "WRITE": 16,
      "STATFS": 17, "RELEASE": 18, "FSYNC": 20, "GETXATTR": 22, "FLUSH": 25, "OPENDIR": 27,
      "READDIR": 28, "RELEASEDIR": 29, "INTERRUPT": 36, "FALLOCATE": 43, "READDIRPLUS": 44}
PUNCH = 0x02 | 0x01


class FuseError(OSError):
    pass


class Client:
    """Send requests, collect replies by unique id; safe to use from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._ids = itertools.count(2, 2)
        self._lock = threading.Lock()
        self._replies: dict[int, tuple[int, bytes]] = {}
        self._cv = threading.Condition(self._lock)
        self._reader: threading.Thread | None = None

    def send(self, opcode: int, nodeid: int, body: bytes, unique: int | None = None) -> int:
        u = next(self._ids) if unique is None else unique
        msg = IN_HDR.pack(IN_HDR.size + len(body), opcode, u, nodeid, 0, 0, os.getpid(), 0, 0)
        self.sock.send(msg + body)
        return u

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def recv_one(self, timeout: float | None = 10.0) -> tuple[int, int, bytes]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(2 << 20)
        ln, err, unique = OUT_HDR.unpack_from(data)
        assert ln == len(data), (ln, len(data))
        return unique, err, data[OUT_HDR.size:]

    def wait(self, unique: int, timeout: float = 10.0) -> bytes:
        while True:
            with self._lock:
                if unique in self._replies:
                    err, body = self._replies.pop(unique)
                    break
                if self._reader is None or not self._reader.is_alive():
                    # we are the reader
                    pass
            u, err, body = self.recv_one(timeout)
            with self._lock:
                self._replies[u] = (err, body)
        if err:
            raise FuseError(-err, os.strerror(-err))
        return body

    def call(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        return self.wait(self.send(opcode, nodeid, body))

    # --- file operations on the one file -------------------------------------------------
    def read(self, off: int, size: int) -> bytes:
        return self.call(OP["READ"], FILE_INO, READ_IN.pack(FILE_INO, off, size, 0, 0, 0, 0))

    def write(self, off: int, data: bytes) -> int:
        body = self.call(OP["WRITE"], FILE_INO,
                         WRITE_IN.pack(FILE_INO, off, len(data), 0, 0, 0, 0) + data)
        return struct.unpack_from("<I", body)[0]

    def punch(self, off: int, length: int, mode: int = PUNCH) -> None:
        self.call(OP["FALLOCATE"], FILE_INO, FALLOC_IN.pack(FILE_INO, off, length, mode, 0))
