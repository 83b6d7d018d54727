"""Hostile input on the real control sockets while a workload holds pages (issue 8, item 13).

Before the fix one line of deeply nested JSON raised RecursionError out of the shard's control
server, which ended it and with it the shard's FUSE server: every page of that device was
lost and the workload died on its next swap-in. Here every attack of the unit tests is sent
to the supervisor's socket and to a shard's, some all at once, while the workload's pages are
swapped out; afterwards status answers, every shard process is alive, and the workload reads
back every page correctly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_swap import finish, wait_held, workload
from tierswap import system
from tierswap.cgroup import MemoryCgroup
from tierswap.control import MAX_MESSAGE, SEND_TIMEOUT

pytestmark = pytest.mark.integration
MiB = 1 << 20


def exchange(path: Path, data: bytes, *, replies: int = 1, timeout: float = 20) -> list[dict]:
    """Send raw bytes, return up to `replies` reply lines (fewer if the server closes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        # the server may close first (a line over the cap); its reply is still there
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        f = s.makefile("rb")
        out = []
        while len(out) < replies:
            line = f.readline(1 << 22)
            if not line:
                break
            out.append(json.loads(line))
        return out
    finally:
        s.close()


def one_line_error(replies: list[dict], *needles: str) -> None:
    assert replies, "no reply"
    r = replies[0]
    assert r.get("ok") is False and "\n" not in r["error"], r
    for n in needles:
        assert n in r["error"], (n, r)


BAD = [  # (request bytes, what the one-line error says)
    (b"[" * 60000 + b"\n", "nested deeper"),
    (b'{"cmd": "status", "x": ' + b"[" * 500 + b"]" * 500 + b"}\n", "nested deeper"),
    (b'{"cmd": "\xff\xfe\xfd"}\n', "not UTF-8"),
    (b"this is not json\n", "not JSON"),
    (b'{"cmd": "ping", "n": NaN}\n', "NaN"),
    (b'["cmd", "status"]\n', '"cmd" string'),
    (b'{"cmd": "format-the-disk"}\n', "unknown command"),
    (b'{"cmd": "policy", "set": [1, 2]}\n', "'set' must map keys"),
    (b'{"cmd": "policy", "set": {"rate": "1"}}\n', "policy.rate"),
    (b'{"cmd": "policy", "set": {"rate": "' + b"9" * 300 + b'"}}\n', "too large"),
    (b'{"cmd": "policy", "set": {"bogus": "1"}}\n', "unknown policy key"),
    (b'{"cmd": "migrate", "from": "ram", "to": "nowhere", "pages": 1}\n', "nowhere"),
    (b'{"cmd": "migrate", "from": "ram", "to": "disk", "pages": "lots"}\n', ""),
    (b'{"cmd": "compact", "tier": 42}\n', "tier"),
]


def attack(path: Path) -> None:
    for data, needle in BAD:
        one_line_error(exchange(path, data), needle)
    # a line over the cap: one error, then the connection is closed
    one_line_error(exchange(path, b'{"cmd": "ping", "x": "' + b"a" * (2 * MAX_MESSAGE)),
                   "longer than")
    # half a line, then hang-up (twenty times)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(b'{"cmd": "sta')
        s.close()


def test_hostile_control_input_while_swap_holds_pages(make_instance, base):
    inst = make_instance(size="1G", ram="16M", disk="1G")
    shard_sock = inst.run_dir / "shard0" / "control.sock"
    sup_sock = inst.run_dir / "control.sock"
    pids = [inst.state()["pid"]] + [sh["pid"] for sh in inst.state()["shards"]]
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-ctl-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "256M", 11, hold) as proc):
        wait_held(proc, hold)
        assert inst.status()["pages"]["stored"] > 1000, "the workload's pages are swapped out"

        for path in (shard_sock, sup_sock):
            attack(path)

        # clients that never read: dozens of requests each, sockets kept open unread
        hogs = []
        for path in (shard_sock, sup_sock):
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                s.setblocking(False)
                req = b'{"cmd": "stats"}\n' if path == shard_sock else b'{"cmd": "status"}\n'
                with contextlib.suppress(BlockingIOError):
                    s.sendall(req * 400)
                hogs.append(s)

        # dozens of concurrent clients, and every attack again, all at once
        errors: list[BaseException] = []

        def guarded(fn, *args) -> None:
            try:
                fn(*args)
            except BaseException as e:
                errors.append(e)

        def client(path: Path) -> None:
            r = exchange(path, b'{"cmd": "ping"}\n')
            assert r and (r[0].get("ok") or "too many" in r[0].get("error", "")), r

        threads = [threading.Thread(target=guarded, args=(client, p))
                   for p in (shard_sock, sup_sock) for _ in range(24)]
        threads += [threading.Thread(target=guarded, args=(attack, p))
                    for p in (shard_sock, sup_sock)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        # the server stayed responsive while the hogs sat there unread
        st = inst.status()
        assert time.monotonic() - t0 < 60
        time.sleep(SEND_TIMEOUT + 2)  # the hogs are dropped by now
        for s in hogs:
            s.close()

        st = inst.status()
        assert st["active"] and st["pages"]["stored"] > 1000
        assert all(system.pid_alive(p) for p in pids), "a daemon process died"
        assert st["io"]["read_errors"] == 0 and st["io"]["write_errors"] == 0
        hold.unlink()
        finish(proc)  # every page verified, exit 0
