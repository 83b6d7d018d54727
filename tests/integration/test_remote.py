"""A real swap device with a remote tier: the kernel swaps through two nbdkit targets, one dies
while pages are out, every page still comes back right, and the returning target (empty, as a
restarted nbdkit memory server is) gets its replicas rebuilt.

One swap device at a time on this machine: other tests and benchmarks swap too, so we wait
for /proc/swaps to be empty first and keep the run short.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import start, stop
from tierswap import system
from tierswap.cgroup import MemoryCgroup, run_in_cgroup

pytestmark = pytest.mark.integration

EXPORT = 512 << 20
SWAP_WAIT = 300.0  # seconds to wait for someone else's swap device to go away


class Nbdkit:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> None:
        for _ in range(50):
            with open(self.tmp / f"nbdkit-{self.port}.log", "ab") as log:
                self.proc = subprocess.Popen(
                    ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p",
                     str(self.port), "memory", str(EXPORT)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                except OSError:
                    time.sleep(0.02)
            self.kill()
            time.sleep(0.1)
        raise AssertionError(f"nbdkit on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


def wait_no_swap() -> None:
    deadline = time.monotonic() + SWAP_WAIT
    while system.active_swaps():
        if time.monotonic() > deadline:
            pytest.skip(f"another swap device stayed active for {SWAP_WAIT:.0f}s")
        time.sleep(2)


def config(base: Path, urls: list[str]) -> str:
    targets = ", ".join(f'"{u}"' for u in urls)
    return f"""
[daemon]
state_dir = "{base}/state"
run_dir = "{base}/run"

[device]
size = "1G"
priority = 100
shards = 1

[[tier]]
name = "ram"
kind = "memory"
capacity = "8M"
compression = "zstd:1"

[[tier]]
name = "net"
kind = "remote"
capacity = "{EXPORT}"
compression = "zstd:1"
targets = [{targets}]
replicas = 2
"""


def remote(st: dict) -> dict:
    return next(t for t in st["tiers"] if t["kind"] == "remote")


def test_remote_target_lost_and_rebuilt(base: Path) -> None:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    servers = [Nbdkit(base), Nbdkit(base)]
    wait_no_swap()
    inst = start(base, config(base, [s.url for s in servers]))
    proc = None
    try:
        hold = base / "hold"
        with MemoryCgroup.create(f"tierswap-remote-{os.getpid()}", 64 << 20) as cg:
            proc = run_in_cgroup(
                cg, [sys.executable, "-m", "tierswap.workload", "--size", "256M",
                     "--hold-file", str(hold), "--hold-timeout", "300"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 180
            while not hold.exists():
                assert proc.poll() is None, f"workload exited early: {proc.communicate()}"
                assert time.monotonic() < deadline, "workload did not finish filling"
                time.sleep(0.2)
            st = remote(inst.status())
            assert st["pages"] > 10_000, f"too little reached the remote tier: {st}"
            assert all(t["up"] for t in st["targets"])
            servers[0].kill()  # pages are held in swap, half of their copies gone
            hold.unlink()
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"workload failed: {out} {err}"
            assert json.loads(out.splitlines()[-1])["ok"]
        st = inst.wait_status(lambda s: not remote(s)["targets"][0]["up"], timeout=30)
        assert remote(st)["targets"][1]["up"]
        assert st["io"]["read_errors"] == 0 and st["io"]["write_errors"] == 0
        servers[0].start()  # back, and empty
        st = inst.wait_status(
            lambda s: all(t["up"] and t["resync_pending"] == 0 for t in remote(s)["targets"]),
            timeout=120)
        net = remote(st)
        assert net["targets"][0]["reconnects"] == 1
        assert net["degraded_segments"] == 0 and net["auth_failures"] == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop(inst.base, inst.config)
        for s in servers:
            s.kill()
