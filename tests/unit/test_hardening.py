"""Secrets and locked memory (issue 8, items 11 and 16), checked through /proc.

* mlockall failing used to be a warning: the daemon then served swap from memory that could
  itself be swapped out. Now it refuses unless daemon.allow_unlocked_memory = true. The
  failure is real here: a child without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK.
* Supervisor and shards were dumpable with the default core limit: a crash could write the RAM
  arena, bounce buffers and keys to a core file. Now PR_SET_DUMPABLE 0 and RLIMIT_CORE 0, and
  the mappings holding such data are MADV_DONTDUMP ("dd" in /proc/PID/smaps VmFlags).
* The sealer's tag array was a zero-filled bytearray, resident (and locked) from the first
  second: 16 GiB for a 4 TiB remote tier. Now it is faulted in only where blocks are sealed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tierswap import hardening
from tierswap.crypto import BLOCK, BlockSealer

MiB = 1 << 20
REPO = Path(__file__).parents[2]


def vmflags(m: mmap.mmap, pid: str = "self") -> set[str]:
    """VmFlags of the mapping that holds `m`, from /proc/PID/smaps."""
    c = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(c)
    del c
    flags: set[str] | None = None
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
    assert flags is not None, "mapping not found in smaps"
    return flags


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def child(code: str, *, prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*(prefix or []), sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, env=env, **kw)


def test_dontdump_marks_the_mapping():
    m = mmap.mmap(-1, 4 * MiB)
    assert "dd" not in vmflags(m)
    hardening.dontdump(m)
    assert "dd" in vmflags(m)


def test_no_core_dumps_in_a_real_process():
    p = child("""
        import os, resource, sys
        from tierswap import hardening
        assert hardening.dumpable()
        assert hardening.no_core_dumps() == []
        print(int(hardening.dumpable()), resource.getrlimit(resource.RLIMIT_CORE))
        print(open(f"/proc/{os.getpid()}/limits").read())
    """)
    assert p.returncode == 0, p.stderr
    first, *rest = p.stdout.splitlines()
    assert first == "0 (0, 0)"
    core = next(ln for ln in rest if ln.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core


def test_the_shard_and_supervisor_state_reports_it():
    st = hardening.hardening_state()
    assert set(st) >= {"VmLck", "VmRSS", "oom_score_adj", "dumpable", "core_limit"}


WITHOUT_IPC_LOCK = ["setpriv", "--bounding-set=-ipc_lock,-sys_admin", "--inh-caps=-all",
                    "--no-new-privs", "prlimit", "--memlock=65536:65536", "--"]
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"),
    reason="needs root, setpriv and prlimit to take CAP_IPC_LOCK away")


@needs_setpriv
def test_refuses_to_serve_when_mlockall_fails():
    p = child("""
        from tierswap import hardening
        try:
            hardening.harden()
        except hardening.HardeningError as e:
            print("refused:", e)
        else:
            print("served unlocked")
        print("allowed:", [f for f in hardening.harden(allow_unlocked=True)
                           if f.startswith("mlockall")])
    """, prefix=WITHOUT_IPC_LOCK)
    assert p.returncode == 0, p.stderr
    refused, allowed = p.stdout.splitlines()
    assert refused.startswith("refused: mlockall failed") and "allow_unlocked_memory" in refused
    assert allowed.startswith("allowed: ['mlockall:")


@needs_setpriv
def test_supervise_refuses_in_one_line(tmp_path):
    """The supervisor's start path (its preflight, which needs /dev/fuse, skipped): the refusal
    is a StartError, before any shard is spawned."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path}/state"
        run_dir = "{tmp_path}/run"
        [device]
        size = "64M"
        [[tier]]
        name = "ram"
        kind = "memory"
        capacity = "8M"
    """))
    p = child(f"""
        from tierswap.config import load_config
        from tierswap.supervisor import StartError, Supervisor, supervise
        Supervisor.preflight = lambda self: None
        try:
            supervise(load_config({str(cfg)!r}), None)
        except StartError as e:
            print("StartError:", e)
    """, prefix=WITHOUT_IPC_LOCK)
    assert p.stdout.startswith("StartError: mlockall failed"), (p.stdout, p.stderr)
    assert p.stdout.count("\n") == 1
    assert not (tmp_path / "run" / "shard0").exists()


def test_sealer_tags_are_not_resident_at_start():
    before = rss()
    s = BlockSealer(64 << 30, b"test/lazy")  # 16 Mi blocks: 384 MiB of counters and tags
    grown = rss() - before
    assert grown < 16 * MiB, f"creating the sealer made {grown >> 20} MiB resident"
    for m in (s.tags._ctr_map, s.tags._tag_map):
        assert "dd" in vmflags(m)
    # it works, and costs memory only where it sealed
    data = os.urandom(4 * BLOCK)
    far = (64 << 30) - 8 * BLOCK
    s.seal(far, data)
    assert bytes(s.open(far, bytes(s.seal(far, data)))) == data
    assert rss() - before < 32 * MiB
    assert s.last_sealed(far - BLOCK, 64 << 30) == far + 3 * BLOCK
    s.tags.close()


def vmflags_at(addr: int, pid: str = "self") -> set[str]:
    flags: set[str] | None = None
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
                break
    assert flags is not None, "no mapping there"
    return flags


async def test_file_tier_bounce_buffers_and_ram_arena_are_dontdump(tmp_path):
    from tests.lane.harness import open_lane

    async with open_lane(mem="4M", disk="16M") as rig:
        disk = rig.svc.tiers[1]
        for buf in disk._pool:  # type: ignore[union-attr]
            assert "dd" in vmflags(buf)
        # the RAM arena is mapped by the native lane (a memfd of the shard's kit)
        assert "dd" in vmflags_at(rig.svc.lane.arena_address(0))


def test_a_fresh_key_is_not_left_in_a_python_object():
    s = BlockSealer(4 * MiB, b"test/key")
    assert not any(isinstance(v, bytes | bytearray) and len(v) == 32
                   for v in vars(s).values())
    assert bytes(s.open(0, bytes(s.seal(0, b"k" * BLOCK)))) == b"k" * BLOCK


def test_systemd_unit_has_no_core_dumps():
    unit = (REPO / "systemd" / "tierswap.service").read_text()
    assert "\nLimitCORE=0\n" in unit
