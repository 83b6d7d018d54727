"""`systemctl restart tierswap` and a crash of the whole unit, on real swap: every process dies
(as KillMode=control-group kills them), the kits live on in systemd's fd store, and the next
start restores every shard from them while swap stays in /proc/swaps (tierswap/fdstore.py).

Honest note: PID 1 here is not systemd, so the test plays systemd's part per its documented
interface (tests/sdstore.py): it provides NOTIFY_SOCKET and keeps what FDSTORE=1 stores
(deduplicating open files as systemd does, honouring FDSTOREREMOVE=1), kills the supervisor and
every shard with SIGKILL, and starts `tierswap up --foreground` with the stored fds at 3.. and
LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set by a wrapper that execs, as systemd does. The
job-type check of ExecStop= (`down --unless-restarting`) is covered by unit tests only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import TIERSWAP, Instance, cli, config_text, leftovers, stop
from tests.integration.test_restart import (
    SwapWatcher,
    held_workload,
    log_mark,
    new_swap_errors,
)
from tests.integration.test_swap import finish, wait_held, workload
from tests.sdstore import NotifyStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def _gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    time.sleep(0.02)  # a zombie: dead, not reaped yet
                    continue
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not die")


class Unit:
    """The supervisor started as systemd's ExecStart= would start it."""

    def __init__(self, base: Path, cfg: Path, sd: NotifyStore) -> None:
        self.base, self.cfg, self.sd = base, cfg, sd
        self.proc: subprocess.Popen | None = None

    def start(self, *, from_store: bool) -> None:
        argv = [*TIERSWAP, "up", "--foreground", "--config", str(self.cfg)]
        env = dict(os.environ, **self.sd.env)
        fds: list[int] = []
        if from_store:
            extra, fds = self.sd.listen_env()
            env |= extra
            argv = [sys.executable, "-m", "tests.sdstore", "--", *argv]
        self.sd.ready.clear()
        with open(self.base / "supervisor.log", "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, pass_fds=fds, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while not self.sd.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("no READY=1: " + (self.base / "supervisor.log")
                                     .read_text()[-3000:])

    def kill_all(self) -> dict[str, int]:
        """SIGKILL the supervisor and every shard, as systemd's cgroup kill would."""
        st = json.loads((self.base / "run" / "state.json").read_text())
        pids = {"supervisor": st["pid"]} | {f"shard{s['shard']}": s["pid"]
                                              for s in st["shards"]}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(30)
        for pid in pids.values():
            _gone(pid)
        return pids


def test_every_process_killed_then_restored_from_the_fd_store(base):
    cfg = base / "tierswap.toml"
    base.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config_text(base, size="2G", ram="64M", disk="2G", shards=2))
    log0 = log_mark()
    with NotifyStore(base / "notify") as sd:
        unit = Unit(base, cfg, sd)
        try:
            unit.start(from_store=False)
            st = json.loads((base / "run" / "state.json").read_text())
            devices = [s["loop"] for s in st["shards"]]
            inst = Instance(base, cfg, devices)
            names = sd.names()
            for k in (0, 1):  # every kit is stored, with its manifest
                assert f"tierswap.{k}.k.fuse" in names and f"tierswap.{k}.k.map" in names
                assert sum(n.startswith(f"tierswap.{k}.manifest.") for n in names) == 1
            assert st["fdstore"] == len(names)
            cg, hold = held_workload(base, 71)
            with cg, workload(cg, "640M", 71, hold) as proc:
                wait_held(proc, hold)
                assert all(t["pages"] > 0 for t in inst.status()["tiers"])
                with SwapWatcher(devices) as watch:
                    hold.unlink()  # verification under way: swap-in requests in flight
                    time.sleep(1.0)
                    before = unit.kill_all()
                    assert all(d in Path("/proc/swaps").read_text() for d in devices)
                    time.sleep(1.0)  # the gap: nothing runs, the store holds every kit
                    unit.start(from_store=True)
                    st = inst.wait_status(lambda s: all(
                        r["state"] == "serving" and r["reporting"] for r in s["shards"]),
                        timeout=60)
                    finish(proc)  # every page verifies
                assert not watch.missing, f"left /proc/swaps: {sorted(set(watch.missing))}"
            after = {"supervisor": st["supervisor"]["pid"]} | {
                f"shard{r['index']}": r["pid"] for r in st["shards"]}
            assert all(after[k] != before[k] for k in before), (before, after)
            assert inst.state()["fdstore"] == len(sd.names())
            assert not new_swap_errors(log0)
            # a stop is still a swapoff, and it empties the store
            cli("down", config=cfg)
            assert unit.proc is not None
            unit.proc.wait(120)
            assert sd.names() == []
            assert not leftovers(base / "run")
        finally:
            if unit.proc is not None and unit.proc.poll() is None:
                with contextlib.suppress(Exception):
                    cli("down", config=cfg, check=False)
                    unit.proc.wait(120)
            sd.clear()  # our copies of the connections go before the force clean-up
            stop(base, cfg)
