"""Helpers for tests that start real network servers (nbdkit) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_nbdkit(port: int, args: tuple[str, ...], log: Path) -> subprocess.Popen[bytes]:
    """An nbdkit server on 127.0.0.1:port that dies with the test process; output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port), *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll until `port` accepts connections, the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False
