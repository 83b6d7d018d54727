"""Bringing a real tierswap up for a test and taking it down in every path.

A test gets a private config (state and run dirs under a fresh temporary directory), a running
instance (`tierswap up`), and on teardown `tierswap down`, then `down --force` if anything is
left, then an assertion that nothing is: no swap, loop device, FUSE mount or process of ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tierswap import system

TIERSWAP = [sys.executable, "-m", "tierswap"]


def reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes.

    kill() and wait() alone leave a PIPE's file objects open; they are closed only when the
    garbage collector gets to them, in whatever later test runs then, where filterwarnings =
    error turns their ResourceWarning into that test's failure.
    """
    if proc.poll() is None:
        proc.kill()
    with proc:  # Popen.__exit__: close stdin/stdout/stderr, then wait
        pass


# mm/swapfile.c's SWAPFILE_CLUSTER on x86-64: the kernel discards freed swap slots a whole
# free cluster at a time, never a freed slot whose cluster still holds a used one.
SWAP_CLUSTER_PAGES = 512


def discards_arrived(st: dict, slack: int = 64) -> bool:
    """Every shard stores no more pages than the kernel can still be holding back discards for.

    After a workload exits, the kernel discards its slots as their clusters empty. A slot in
    use by anyone else (another process's page, the swap cache) keeps its cluster, so up to
    SWAP_CLUSTER_PAGES freed slots around it stay stored until that one goes too (seen in CI:
    3 pages in use kept 407 stored). Without discards reaching us the map would keep the
    workload's tens of thousands of pages: this still tells the two apart. `slack`: mkswap's
    header page and what the status read races with.
    """
    for sh in st["shards"]:
        used = (sh.get("swap") or {}).get("used", 0) // 4096
        if sh["stored_pages"] > max(slack, used * SWAP_CLUSTER_PAGES):
            return False
    return True


def missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("losetup", "mkswap", "swapon", "swapoff"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    from tierswap.cgroup import detect

    if detect() is None:
        return "no memory cgroup controller"
    return None


def skip_without_capabilities() -> None:
    why = missing_capability()
    if why:
        pytest.skip(why)


def cli(*args: str, config: Path | None = None, check: bool = True, timeout: float = 300,
        **kw) -> subprocess.CompletedProcess:
    argv = [*TIERSWAP, *args]
    if config is not None:
        argv += ["--config", str(config)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def config_text(base: Path, *, size: str = "2G", ram: str = "64M", disk: str = "2G",
                shards: int = 1, extra: str = "") -> str:
    return f"""
[daemon]
state_dir = "{base}/state"
run_dir = "{base}/run"

[device]
size = "{size}"
priority = 100
shards = {shards}

[[tier]]
name = "ram"
kind = "memory"
capacity = "{ram}"
compression = "zstd:1"

[[tier]]
name = "disk"
kind = "file"
path = "{base}/state/disk.tier"
capacity = "{disk}"
{extra}
"""


@dataclass
class Instance:
    base: Path
    config: Path
    devices: list[str]

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def status(self) -> dict:
        return json.loads(cli("status", "--json", config=self.config).stdout)

    def state(self) -> dict:
        return json.loads((self.run_dir / "state.json").read_text())

    def wait_status(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        st = self.status()
        while not predicate(st):
            if time.monotonic() > deadline:
                raise AssertionError(f"status condition not reached in {timeout}s: {st}")
            time.sleep(0.2)
            st = self.status()
        return st


def leftovers(run_dir: Path) -> list[str]:
    left = [f"loop {d['name']}" for d in system.loop_list()
            if (d.get("back-file") or "").startswith(f"{run_dir}/")
            or d.get("back-file") == "/swap.img"]  # our file on a lazily unmounted FUSE
    left += [f"mount {m}" for m in system.fuse_mounts_under(run_dir)]
    p = subprocess.run(["pgrep", "-f", f"tierswap.*{run_dir.parent}"], capture_output=True,
                       text=True)
    left += [f"process {pid}" for pid in p.stdout.split()]
    return left


def start(base: Path, text: str) -> Instance:
    base.mkdir(parents=True, exist_ok=True)
    cfg = base / "tierswap.toml"
    cfg.write_text(text)
    p = cli("up", config=cfg, check=False)
    if p.returncode != 0:
        stop(base, cfg)
        raise AssertionError(f"tierswap up failed: {p.stderr.strip()}")
    return Instance(base, cfg, p.stdout.split())


def stop(base: Path, cfg: Path) -> None:
    """Down, then force, then check: in every path nothing of ours may stay active."""
    cli("down", config=cfg, check=False)
    run_dir = base / "run"
    if leftovers(run_dir):
        cli("down", "--force", config=cfg, check=False)
    left = leftovers(run_dir)
    assert not left, f"left behind after down: {left}"
