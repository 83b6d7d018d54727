"""systemd's side of the fd store, played by a test per its documented interface.

PID 1 here is not systemd, so tests that exercise `tierswap/fdstore.py` stand in for it:

* `NotifyStore` binds the notification socket (NOTIFY_SOCKET, an AF_UNIX datagram socket) and
  keeps what sd_notify(3) messages store: "FDSTORE=1" with "FDNAME=" and the fds attached by
  SCM_RIGHTS, "FDSTOREREMOVE=1" with "FDNAME=" (every fd of that name is closed). As systemd
  does (service_add_fd_store, same_fd), an fd referring to an open file already stored is
  ignored; this is compared with kcmp(KCMP_FILE). "READY=1" and the rest are recorded.
* Running this module (`python -m tests.sdstore -- ARGV...`) passes fds on the way systemd's
  ExecStart= does (sd_listen_fds(3)): the fds named in SDSTORE_FDS ("fd=name,fd=name") are
  moved to 3, 4, ... in that order, LISTEN_FDS, LISTEN_FDNAMES (":"-separated) and LISTEN_PID
  (this process: it then execs ARGV, keeping its pid) are set.

What it does not play: FileDescriptorStoreMax= (no limit), POLLHUP watching (we send FDPOLL=0),
access control (NotifyAccess=), job types and the cgroup kill (the tests do that part).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import socket
import sys
import threading
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = 312  # x86_64
KCMP_FILE = 0


def same_file(a: int, b: int) -> bool:
    """Whether two of our fds are one open file description (systemd's same_fd)."""
    pid = os.getpid()
    r = _libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, a, b)
    if r < 0:
        sa, sb = os.fstat(a), os.fstat(b)
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return r == 0


class NotifyStore:
    """A notification socket and the fd store behind it (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.fds: list[tuple[str, int]] = []  # in the order stored, as systemd passes them
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def __enter__(self) -> NotifyStore:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()
        self.clear()

    def receive_one(self) -> bool:
        try:
            msg, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
        except (TimeoutError, BlockingIOError):
            return False
        got = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
        self.handle(msg.decode(), list(got))
        return True

    def handle(self, text: str, fds: list[int]) -> None:
        fields = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
        with self.lock:
            self.messages.append(text)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if any(same_file(fd, have) for _n, have in self.fds):
                        os.close(fd)  # already stored: ignored, as systemd does
                    else:
                        self.fds.append((name, fd))
                fds = []
            elif fields.get("FDSTOREREMOVE") == "1":
                for n, fd in [x for x in self.fds if x[0] == name]:
                    self.fds.remove((n, fd))
                    os.close(fd)
            if fields.get("READY") == "1":
                self.ready.set()
        for fd in fds:  # fds on any other message are closed, as systemd does
            os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.receive_one()

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _fd in self.fds]

    def listen_env(self) -> tuple[dict[str, str], list[int]]:
        """The environment and pass_fds for `python -m tests.sdstore -- ARGV` (the next start)."""
        with self.lock:
            spec = ",".join(f"{fd}={n}" for n, fd in self.fds)
            return {"SDSTORE_FDS": spec}, [fd for _n, fd in self.fds]

    def clear(self) -> None:
        with self.lock:
            for _n, fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fds.clear()


def _exec_with_listen_fds(argv: list[str]) -> None:
    spec = os.environ.pop("SDSTORE_FDS", "")
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    n = len(pairs)
    # first out of the way of 3..3+n, then into place (fds 3.. are free by then)
    floor = max([3 + n, *(int(fd) + 1 for fd, _name in pairs)])
    high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, floor) for fd, _name in pairs]
    for fd, _name in pairs:
        with contextlib.suppress(OSError):
            os.close(int(fd))
    for i, h in enumerate(high):
        os.dup2(h, 3 + i, inheritable=True)
        os.close(h)
    os.environ["LISTEN_FDS"] = str(n)
    os.environ["LISTEN_FDNAMES"] = ":".join(name for _fd, name in pairs)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    _exec_with_listen_fds(args)
