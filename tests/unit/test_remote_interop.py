"""The remote tier against NBD servers operators run in front of real storage: qemu-nbd
(Debian qemu-utils; e.g. an RBD image or a qcow2/raw file) and nbd-server (Debian nbd-server;
e.g. a logical volume), alone and mixed with nbdkit in one erasure-coded tier.

Each server exports a sparse file, which survives a server restart: killing one is an outage
(the target must be verified, not rebuilt), unlike nbdkit's memory plugin (a loss). As in
test_remote_tier.py the tier is a store of a real lane: pages are written and read through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lane.harness import PAGE, all_runs
from tests.netutil import free_port, wait_listening
from tests.unit.test_remote_tier import (
    CAPACITY,
    make_config,
    remote_lane,
    wait_for,
)
from tests.unit.test_remote_tier import nbdkit as nbdkit  # the fixture
from tierswap.nbd import open_nbd_client
from tierswap.tiers.base import SEG_SIZE, TierError
from tierswap.tiers.remote import RemoteTier


class External:
    """qemu-nbd or nbd-server exporting `image` as "swap" on a fixed port; restartable."""

    def __init__(self, kind: str, image: Path, size: int, *, read_only: bool = False) -> None:
        self.kind, self.image, self.read_only = kind, image, read_only
        with open(image, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None  # qemu-nbd: our child
        self.start()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/swap"

    def start(self) -> None:
        log = open(self.image.with_suffix(".log"), "ab")  # noqa: SIM115 - the child keeps it
        if self.kind == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--discard=unmap", "-b",
                    "127.0.0.1", "-p", str(self.port), "-x", "swap", str(self.image)]
            if self.read_only:
                argv.insert(1, "-r")
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
            self.pid = self.proc.pid
            ok = wait_listening(self.proc, self.port, 10)
        else:  # nbd-server daemonizes (it forks per client); its pid file names the parent
            conf = self.image.with_suffix(".conf")
            pidfile = self.image.with_suffix(".pid")
            pidfile.unlink(missing_ok=True)
            conf.write_text(f"[generic]\n    listenaddr = 127.0.0.1\n    port = {self.port}\n"
                            f"[swap]\n    exportname = {self.image}\n    trim = true\n"
                            f"    readonly = {'true' if self.read_only else 'false'}\n")
            subprocess.run(["nbd-server", "-C", str(conf), "-p", str(pidfile)], check=True,
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=10)
            ok = _listening(self.port, 10)
            self.pid = None  # the daemon, not the process that wrote the pid file first
            deadline = time.monotonic() + 10
            while self.pid is None and time.monotonic() < deadline:
                self.pid = next(iter(_running_with(str(conf))), None)
                time.sleep(0.02)
        log.close()
        assert ok, f"{self.kind} did not start on port {self.port}"

    def kill(self) -> None:
        if self.pid is not None:
            # the server and its per-connection children share its session's process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(timeout=10)
            self.pid = self.proc = None
        if self.kind == "nbd-server":  # and anything else still serving this config
            for pid in _running_with(str(self.image.with_suffix(".conf"))):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _running_with(arg: str) -> list[int]:
    """Processes with `arg` (a path unique to one test server) among their arguments."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in argv:
                pids.append(int(d.name))
    return sorted(pids)


def _listening(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


@pytest.fixture
def external(tmp_path: Path) -> Iterator[Callable[..., External]]:
    servers: list[External] = []

    def make(kind: str, size: int = CAPACITY, **kw) -> External:
        if shutil.which(kind) is None:
            pytest.skip(f"{kind} is not installed (apt install "
                        f"{'qemu-utils' if kind == 'qemu-nbd' else 'nbd-server'})")
        s = External(kind, tmp_path / f"{kind}-{len(servers)}.img", size, **kw)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.kill()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbd-server"])
async def test_one_replica_on_an_external_server(external, tmp_path: Path, kind: str) -> None:
    server = external(kind)
    async with remote_lane(tmp_path, [server], replicas=1) as r:
        tier = r.tier
        await r.fill(3)
        await r.check_all()
        assert tier.can_trim and tier.targets[0].client is not None
        assert tier.targets[0].client.can_trim
        for run in all_runs(r.rig, r.index):  # empty segment 0
            if run.base < SEG_SIZE and run.nbytes:
                await r.rig.client.punch(run.start * PAGE, run.npages * PAGE)
                r.model[run.start * PAGE : (run.start + run.npages) * PAGE] = \
                    bytes(run.npages * PAGE)
        await tier.trim(0, SEG_SIZE)  # the export gives the room back
        async with open_nbd_client(server.url) as raw:
            assert await raw.read(0, SEG_SIZE) == bytes(SEG_SIZE)
        await r.check_all()
        server.kill()  # an outage: the file behind it keeps the pages
        await wait_for(lambda: not tier.targets[0].up)
        server.start()
        await wait_for(lambda: tier.targets[0].up and
                       tier.extra_statistics()["degraded_segments"] == 0, 20)  # type: ignore
        await r.check_all()
        assert tier.extra_statistics()["auth_failures"] == 0


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbd-server"])
async def test_read_only_export_refused(external, tmp_path: Path, kind: str) -> None:
    server = external(kind, read_only=True)
    cfg = make_config(tmp_path, [server], replicas=1)  # type: ignore[list-item]
    with pytest.raises(TierError, match="read-only") as info:
        await RemoteTier.create(cfg.tiers[-1], 0, cfg, 0)
    assert info.value.errno == errno.EROFS


async def test_erasure_over_nbdkit_qemu_nbd_and_nbd_server(nbdkit, external,
                                                             tmp_path: Path) -> None:
    export = CAPACITY // 2  # 2+1 over 3 targets: one fragment of every segment each
    servers = [nbdkit("memory", str(export)), external("qemu-nbd", export),
               external("nbd-server", export)]
    async with remote_lane(tmp_path, servers, extra='erasure = "2+1"') as r:
        tier = r.tier
        assert tier.store is not None
        await r.fill(4)
        await tier.store.flush(unstage=True)
        await r.check_all()
        for i in (1, 2):  # each external server down in turn: decoded from the other two
            servers[i].kill()
            await r.check_all()
            await wait_for(lambda i=i: not tier.targets[i].up)
            servers[i].start()
            await wait_for(lambda: all(t["up"] and t["rebuild_backlog"] == 0
                                       for t in tier.extra_statistics()["targets"]), 20)
        st = tier.extra_statistics()
        assert st["degraded_reads"] > 0 and st["auth_failures"] == 0
        assert st["rebuilt_fragments"] == 0  # outages, verified: nothing had to be rebuilt
        servers[0].kill()  # the memory server: its fragments were lost
        await wait_for(lambda: not tier.targets[0].up)
        servers[0].start()
        await wait_for(lambda: all(t["up"] and t["rebuild_backlog"] == 0
                                   for t in tier.extra_statistics()["targets"]), 20)
        st = tier.extra_statistics()
        assert st["rebuilt_fragments"] == st["targets"][0]["fragments"] > 0  # type: ignore
        servers[1].kill()
        await r.check_all()
