#!/usr/bin/env python3
"""Side-by-side swap benchmark: zram, a plain swap file (via loop and direct) and tierswap.

Run as root from the repository (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_swap.py [--size 1G] [--limit 256M] [--runs 1]
        [--only baseline,zram,file,swapfile,tierswap] [--shards 1,2] [--profile]
        [--out docs/benchmarks.md]

Every backend runs the same verifying workload (`python -m tierswap.workload`, same size and
seed) inside a memory cgroup much smaller than the workload, so the fill phase is bounded by
swap-out and the seq/rand verify phases by swap-in. While the filled pages are held (the
workload's --hold-file; the hold is outside the timed phases) the script reads compression
statistics (zram mm_stat, `tierswap status --json`) and measures 4 KiB random-read latency at
queue depth 1 with O_DIRECT preads on the swap block device.

Only one swap device is active at a time: the script refuses to start when /proc/swaps is not
empty, and every path (errors, SIGINT, SIGTERM, SIGHUP) kills the workload, then swapoffs and
removes what it set up. Raw results go to bench-results/ (gitignored); the markdown report goes
to --out (default: stdout). `--from-json FILE` re-renders a report from saved raw results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tierswap.benchlib import (  # noqa: E402
    PAGE,
    BenchError,
    private_config_text,
    probe_latency,
    probe_overhead,
    zram_snapshot,
)
from tierswap.cgroup import MemoryCgroup, run_in_cgroup  # noqa: E402
from tierswap.system import active_swaps  # noqa: E402
from tierswap.workload import parse_size  # noqa: E402

RESULTS_DIR = REPO / "bench-results"
BACKENDS = ("baseline", "zram", "file", "swapfile", "tierswap")
DEFAULT_ONLY = "baseline,zram,file,swapfile,tierswap"
PRIORITY = 100
TARGETS = {  # metric -> (comparison, threshold, description)
    "fill": (">=", 1.0, "swap-out (fill MB/s) vs zram"),
    "seq": (">=", 0.8, "swap-in sequential (seq MB/s) vs zram"),
    "rand": (">=", 0.3, "swap-in random (rand MB/s) vs zram"),
    "compression": (">=", 1.6, "compression ratio vs zram"),
    "metadata": ("<=", 16.0, "metadata bytes per stored page (absolute)"),
    "p50": ("<=", 40.0, "4 KiB QD1 read p50 in µs (absolute)"),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
TS_COMPRESSION = os.environ.get("BENCH_TS_COMPRESSION", "zstd:1")


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every finally block like KeyboardInterrupt does."""


_stopping = False


def _on_signal(signum: int, _frame: Any) -> None:
    global _stopping
    if _stopping:  # already unwinding: let the teardown finish
        return
    _stopping = True
    raise Interrupted(signal.Signals(signum).name)


def _on_sigint(signum: int, frame: Any) -> None:
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------ helpers


def sh(argv: list[str], timeout: float = 120.0, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip()
        raise BenchError(f"{' '.join(argv)}: exit {p.returncode}: {err}")
    return p.stdout




def require_no_swap(when: str) -> None:
    sw = active_swaps()
    if sw:
        raise BenchError(f"{when}: swap is already active ({', '.join(sw)}); this benchmark "
                         "needs to be the only swap user. Nothing was changed.")


def wait_exclusive(seconds: float, when: str) -> float:
    """Wait (up to `seconds`) until no swap is active for 3 s in a row; returns seconds waited.

    Other users of this machine may swapon their own devices at any time; a benchmark while
    another device is active measures both, and pages of our workload may land on theirs.
    """
    t0 = time.monotonic()
    quiet_since: float | None = None
    announced = False
    while True:
        now = time.monotonic()
        if active_swaps():
            quiet_since = None
            if now - t0 >= seconds:
                require_no_swap(when)  # raises with the list of devices
            if not announced:
                print(f"   waiting for other swap devices to go ({', '.join(active_swaps())})",
                      file=sys.stderr, flush=True)
                announced = True
        else:
            if quiet_since is None:
                quiet_since = now
            if seconds <= 0 or now - quiet_since >= 3.0:
                return round(now - t0, 1)
        time.sleep(0.5)


class SwapWatcher(threading.Thread):
    """Notes every swap device that is not ours while a backend is measured."""

    def __init__(self, mine: list[str]) -> None:
        super().__init__(daemon=True)
        self.mine = set(mine)
        self.foreign: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            with contextlib.suppress(OSError, ValueError, StopIteration):
                for n in active_swaps():
                    if n not in self.mine and n not in self.foreign:
                        self.foreign[n] = round(time.monotonic() - self.t0, 1)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join(timeout=5)
        return dict(self.foreign)


def swapoff(dev: str) -> None:
    if dev in active_swaps():
        sh(["swapoff", dev], timeout=1800)


def proc_stat_cpu() -> dict[str, float]:
    """System-wide CPU seconds by state (from the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    d = {n: v[i] / CLK_TCK for i, n in enumerate(names) if i < len(v)}
    return d


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    d = {k: round(b[k] - a[k], 2) for k in a}
    d["busy"] = round(sum(v for k, v in d.items() if k not in ("idle", "iowait")), 2)
    return d


def pid_cpu(pid: int) -> float | None:
    """utime + stime of a process (all its threads) in seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


PF_KTHREAD = 0x00200000


def all_proc_cpu() -> dict[int, tuple[str, float, bool, int]]:
    """pid -> (comm, utime+stime seconds, kernel thread?, start time) for every process."""
    out: dict[int, tuple[str, float, bool, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(d)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK,
                       bool(int(fields[6]) & PF_KTHREAD), int(fields[19]))
    return out


def proc_cpu_delta(a: dict[int, tuple[str, float, bool, int]],
                   b: dict[int, tuple[str, float, bool, int]], mine: set[int]) -> dict[str, Any]:
    """CPU seconds between two snapshots: ours, kernel threads, and everybody else's.

    Processes that both started and ended between the snapshots are not seen; the
    remainder of /proc/stat's busy time not attributed here is such short-lived work.
    """
    kern: Counter[str] = Counter()
    other: Counter[str] = Counter()
    ours = 0.0
    for pid, (comm, cpu, kt, start) in b.items():
        d = cpu - (a[pid][1] if pid in a and a[pid][3] == start else 0.0)
        if d <= 0:
            continue
        if pid in mine:
            ours += d
        elif kt:
            kern[comm.split("/")[0] if comm.startswith("kworker") else comm] += d
        else:
            other[comm] += d
    return {
        "ours": round(ours, 2),
        "kernel_threads": round(sum(kern.values()), 2),
        "kernel_top": [(k, round(v, 2)) for k, v in kern.most_common(5)],
        "others": round(sum(other.values()), 2),
        "others_top": [(k, round(v, 2)) for k, v in other.most_common(5)],
    }


def block_stat_path(dev: str) -> Path:
    """/sys path of the stat file of a block device node (works for partitions too)."""
    st = os.stat(dev)
    return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/stat")


def fs_disk_stat_path(path: Path) -> Path:
    st = os.stat(path)
    return Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")


def read_block_stat(p: Path) -> list[int]:
    return [int(x) for x in p.read_text().split()]


def io_delta(a: list[int], b: list[int]) -> dict[str, Any]:
    """Requests, bytes and average request size between two /sys/block/X/stat samples."""
    d = [y - x for x, y in zip(a, b, strict=False)]
    out: dict[str, Any] = {"reads": d[0], "read_bytes": d[2] * 512,
                           "writes": d[4], "write_bytes": d[6] * 512}
    if len(d) >= 14:
        out["discards"] = d[11]
        out["discard_bytes"] = d[13] * 512
    out["avg_read_kib"] = round(d[2] * 512 / d[0] / 1024, 2) if d[0] else None
    out["avg_write_kib"] = round(d[6] * 512 / d[4] / 1024, 2) if d[4] else None
    return out


def sum_io(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("reads", "read_bytes", "writes", "write_bytes", "discards", "discard_bytes")
    out: dict[str, Any] = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    out["avg_read_kib"] = (round(out["read_bytes"] / out["reads"] / 1024, 2)
                           if out["reads"] else None)
    out["avg_write_kib"] = (round(out["write_bytes"] / out["writes"] / 1024, 2)
                            if out["writes"] else None)
    return out


def median(values: list[Any]) -> Any:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------------------ backends


class Backend:
    name = "?"
    label = "?"
    swap = True

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def swap_names(self) -> list[str]:
        """Names as they appear in /proc/swaps."""
        return []

    def stat_files(self) -> dict[str, Path]:
        """Block stat files to diff per phase: label -> /sys/.../stat."""
        return {}

    def probe_paths(self) -> list[str]:
        return self.swap_names()

    def daemon_pids(self) -> dict[str, int]:
        return {}

    def snapshot(self) -> dict[str, Any]:
        """Backend statistics while the pages are held."""
        return {}

    def config(self) -> dict[str, Any]:
        return {}


class Baseline(Backend):
    """No swap and a cgroup larger than the workload: the workload's own speed limit."""

    name = "baseline"
    label = "baseline (no swap, no memory pressure)"
    swap = False


class Zram(Backend):
    name = "zram"

    def __init__(self, size: int, algorithm: str) -> None:
        self.size = size
        self.algorithm = algorithm
        self.label = f"zram ({algorithm})"
        self.dev: str | None = None
        self.hot_added = False

    def setup(self) -> None:
        before = set(Path("/sys/block").glob("zram*"))
        try:
            self.dev = sh(["zramctl", "--find", "--size", str(self.size),
                           "--algorithm", self.algorithm]).strip()
        except BenchError as e:
            print(f"zramctl failed ({e}); using /sys/class/zram-control/hot_add", file=sys.stderr)
            n = int(Path("/sys/class/zram-control/hot_add").read_text())
            self.dev = f"/dev/zram{n}"
            self.hot_added = True
            sysd = Path(f"/sys/block/zram{n}")
            (sysd / "comp_algorithm").write_text(self.algorithm)
            (sysd / "disksize").write_text(str(self.size))
        if Path("/sys/block") / Path(self.dev).name not in before:
            self.hot_added = True
        alg = (self.sysdir / "comp_algorithm").read_text()
        if f"[{self.algorithm}]" not in alg:
            raise BenchError(f"{self.dev}: algorithm is {alg.strip()!r}, not {self.algorithm}")
        sh(["mkswap", self.dev])
        sh(["swapon", "--priority", str(PRIORITY), self.dev])

    @property
    def sysdir(self) -> Path:
        assert self.dev is not None
        return Path("/sys/block") / Path(self.dev).name

    def teardown(self) -> None:
        if self.dev is None:
            return
        swapoff(self.dev)
        name = Path(self.dev).name
        sh(["zramctl", "--reset", self.dev], check=False)
        # zramctl --reset also hot-removes the device when zram-control exists (util-linux
        # 2.38): remove one we added, put back one that was there before we came.
        present = (Path("/sys/block") / name).exists()
        with contextlib.suppress(OSError, ValueError):
            if self.hot_added and present:
                Path("/sys/class/zram-control/hot_remove").write_text(name.removeprefix("zram"))
            elif not self.hot_added and not present:
                Path("/sys/class/zram-control/hot_add").read_text()
        self.dev = None

    def swap_names(self) -> list[str]:
        return [self.dev] if self.dev else []

    def stat_files(self) -> dict[str, Path]:
        return {Path(self.dev).name: self.sysdir / "stat"} if self.dev else {}

    def snapshot(self) -> dict[str, Any]:
        return zram_snapshot(self.sysdir)

    def config(self) -> dict[str, Any]:
        return {"disksize": self.size, "algorithm": self.algorithm, "device": self.dev}


class FileSwap(Backend):
    """A pre-allocated swap file in /var/tmp, via a direct-I/O loop device or directly."""

    def __init__(self, size: int, directory: Path, use_loop: bool) -> None:
        self.size = size
        self.directory = directory
        self.use_loop = use_loop
        self.name = "file" if use_loop else "swapfile"
        self.label = ("swap file via loop (direct-io)" if use_loop
                      else "swap file, swapon directly (no loop)")
        self.path: Path | None = None
        self.loop: str | None = None

    def setup(self) -> None:
        fd, p = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".swap",
                                 dir=self.directory)
        self.path = Path(p)
        try:
            os.fchmod(fd, 0o600)
            # Written, not fallocated: ext4 keeps fallocated extents "unwritten" (swap writes
            # bypass the file system), so O_DIRECT reads of the file would return zeros
            # without touching the disk, and loop writes would pay extent conversion.
            chunk = bytes(8 << 20)
            for off in range(0, self.size, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), self.size - off)], off)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, self.size, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if self.use_loop:
            self.loop = sh(["losetup", "--find", "--show", "--direct-io=on",
                            str(self.path)]).strip()
        target = self.loop or str(self.path)
        sh(["mkswap", target])
        sh(["swapon", "--priority", str(PRIORITY), target])

    def teardown(self) -> None:
        for name in self.swap_names():
            swapoff(name)
        if self.loop:
            sh(["losetup", "--detach", self.loop], check=False)
            self.loop = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def swap_names(self) -> list[str]:
        if self.loop:
            return [self.loop]
        return [str(self.path)] if self.path else []

    def stat_files(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        if self.loop:
            out[Path(self.loop).name] = block_stat_path(self.loop)
        if self.path is not None:  # the disk under /var/tmp; shared with the rest of the VM
            out["disk"] = fs_disk_stat_path(self.path)
        return out

    def config(self) -> dict[str, Any]:
        return {"file_size": self.size, "directory": str(self.directory), "loop": self.use_loop,
                "wbt_lat_usec": wbt_lat_usec(self.loop) if self.loop else None,
                "allocation": "written with zeros (no unwritten extents)"}


def tierswap_tree() -> dict[str, Any]:
    """Which tierswap code a run used: HEAD, files changed against it, a hash of the sources.

    Daemons import the working tree when they start, and other people commit while a long
    benchmark runs, so this is recorded per run, not once.
    """
    import hashlib

    h = hashlib.sha1()
    for f in sorted((REPO / "tierswap").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    head = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).strip()
    dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "tierswap"],
               check=False).split("\n")
    return {"head": head, "dirty": [ln[3:] for ln in dirty if ln.strip()],
            "sources_sha1": h.hexdigest()[:12]}


def wbt_lat_usec(dev: str) -> int | None:
    """Writeback throttling target of a blk-mq device (loop has it, zram does not)."""
    p = Path("/sys/block") / Path(dev).name / "queue" / "wbt_lat_usec"
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return None


class Tierswap(Backend):
    name = "tierswap"

    def __init__(self, shards: int, dev_size: int, mem_cap: int, file_cap: int,
                 file_dir: Path, cli: list[str], wbt_off: bool = False) -> None:
        self.shards = shards
        self.wbt_off = wbt_off
        self.label = (f"tierswap, {shards} shard{'s' if shards > 1 else ''}"
                      + (", wbt off" if wbt_off else ""))
        self.name = f"tierswap-s{shards}" + ("-wbtoff" if wbt_off else "")
        self.dev_size, self.mem_cap, self.file_cap = dev_size, mem_cap, file_cap
        self.file_dir = file_dir
        self.cli = cli
        self.tmp: Path | None = None
        self.tier_dir: Path | None = None
        self.cfg_path: Path | None = None
        self.loops: list[str] = []
        self.state: dict[str, Any] = {}
        self.up_output = ""
        self.wbt_default: dict[str, int | None] = {}

    def config_text(self) -> str:
        assert self.tmp is not None and self.tier_dir is not None
        return private_config_text(
            state_dir=self.tmp / "state", run_dir=self.tmp / "run",
            tier_file=self.tier_dir / "disk.tier", device_size=self.dev_size,
            memory_capacity=self.mem_cap, file_capacity=self.file_cap, shards=self.shards,
            priority=PRIORITY, memory_compression=TS_COMPRESSION)

    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-tierswap-"))
        self.tier_dir = Path(tempfile.mkdtemp(prefix="bench-tierswap-", dir=self.file_dir))
        self.cfg_path = self.tmp / "tierswap.toml"
        self.cfg_path.write_text(self.config_text())
        p = subprocess.run([*self.cli, "up", "--config", str(self.cfg_path)],
                           capture_output=True, text=True, timeout=300)
        self.up_output = (p.stdout + p.stderr).strip()
        if p.returncode != 0:
            raise BenchError(f"tierswap up failed (exit {p.returncode}): {self.up_output}")
        self.loops = p.stdout.split()
        self.state = json.loads((self.tmp / "run" / "state.json").read_text())
        self.wbt_default = {d: wbt_lat_usec(d) for d in self.loops}
        if self.wbt_off:  # a block-layer knob of the loop device, not a tierswap setting
            for d in self.loops:
                (Path("/sys/block") / Path(d).name / "queue" / "wbt_lat_usec").write_text("0")

    def status(self) -> dict[str, Any]:
        assert self.cfg_path is not None
        out = sh([*self.cli, "status", "--config", str(self.cfg_path), "--json"], timeout=60)
        return json.loads(out)

    def teardown(self) -> None:
        if self.cfg_path is None:
            return
        p = subprocess.run([*self.cli, "down", "--config", str(self.cfg_path)],
                           capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            print(f"tierswap down failed: {(p.stderr or p.stdout).strip()}; retrying with "
                  "--force", file=sys.stderr)
            subprocess.run([*self.cli, "down", "--force", "--config", str(self.cfg_path)],
                           capture_output=True, text=True, timeout=1800)
        for d in (self.tmp, self.tier_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self.cfg_path = None
        self.loops = []

    def swap_names(self) -> list[str]:
        return list(self.loops)

    def stat_files(self) -> dict[str, Path]:
        return {Path(d).name: block_stat_path(d) for d in self.loops}

    def daemon_pids(self) -> dict[str, int]:
        out = {"supervisor": int(self.state["pid"])}
        for s in self.state.get("shards", []):
            out[f"shard{s['shard']}"] = int(s["pid"])
        return out

    def snapshot(self) -> dict[str, Any]:
        st = self.status()
        stored = st["pages"]["stored"]
        used = sum((t["segments"] - t["free_segments"]) << 20 for t in st["tiers"])
        arena = sum(t.get("arena_bytes", 0) for t in st["tiers"])
        return {
            "status": st,
            "stored_pages": stored,
            "zero_pages": st["pages"]["zero"],
            "compression_ratio": st["compression_ratio"],  # non-zero pages / live stored bytes
            "ratio_incl_zero": ((stored + st["pages"]["zero"]) * PAGE / st["stored_bytes"]
                                if st["stored_bytes"] else None),
            "segment_bytes_in_use": used,
            "ratio_vs_segments_in_use": stored * PAGE / used if used else None,
            "memory_arena_bytes": arena,
            "metadata_bytes": st["metadata_bytes"],
            "metadata_bytes_per_page": st["metadata_bytes_per_page"],
        }

    def config(self) -> dict[str, Any]:
        return {"shards": self.shards, "device_size": self.dev_size,
                "memory_capacity": self.mem_cap, "file_capacity": self.file_cap,
                "file_dir": str(self.file_dir), "compression": "zstd:1",
                "config_toml": self.config_text() if self.tmp else None,
                "loops": self.loops, "wbt_lat_usec_default": self.wbt_default,
                "wbt_lat_usec": {d: wbt_lat_usec(d) for d in self.loops}}


# ------------------------------------------------------------------------------ py-spy


class Profiler:
    """py-spy record on some pids until stop(); raw (collapsed) stacks per pid."""

    def __init__(self, exe: str, pids: dict[str, int], out_prefix: Path, rate: int,
                 native: bool = True) -> None:
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        self.t0 = time.monotonic()
        self.rate = rate
        for label, pid in pids.items():
            out = out_prefix.with_name(f"{out_prefix.name}-{label}.txt")
            argv = [exe, "record", "-p", str(pid), "-f", "raw", "--threads", "--rate", str(rate),
                    "--duration", "1200", "-o", str(out)] + (["--native"] if native else [])
            p = subprocess.Popen(argv,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.procs.append((label, out, p))

    def stop(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t0
        res: dict[str, Any] = {}
        for label, out, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                _, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            res[label] = summarize_profile(out, seconds, self.rate)
            if not out.exists():
                res[label]["error"] = err.decode(errors="replace").strip()[-500:]
        return res

    def kill(self) -> None:
        for _, _, p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)'; thread roots stay as they are."""
    if " (" not in frame or not frame.endswith(")"):
        return frame
    fn, _, loc = frame.rpartition(" (")
    if fn.startswith("0x"):  # unsymbolised native address: keep only the library
        fn = "?"
    path = loc[:-1].rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{fn} ({short})"


def summarize_profile(path: Path, seconds: float, rate: int, top: int = 15) -> dict[str, Any]:
    if not path.exists():
        return {"file": str(path), "samples": 0}
    self_c: Counter[str] = Counter()
    main_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        root = frames[0] if frames else ""
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0]] += count
            frames = frames[1:]
        while frames and frames[0].startswith(("process", "thread")):
            frames = frames[1:]
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        leaf = names[-1]
        k = len(names) - 2
        while leaf.endswith(".so.6)") and k >= 0:  # libc leaf: say who called it
            leaf = f"{leaf} <- {names[k]}"
            if not names[k].endswith(".so.6)"):
                break
            k -= 1
        self_c[leaf] += count
        if "MainThread" in root:
            main_c[leaf] += count
        for nm in set(names):
            if "tierswap/" in nm and not nm.startswith(("<module>", "main ")):
                incl[nm] += count
    return {
        "file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "seconds": round(seconds, 1),
        "rate_hz": rate,
        "samples": total,
        "busy_fraction": round(total / (seconds * rate), 3) if seconds else None,
        "threads": dict(threads.most_common()),
        "self": self_c.most_common(top),
        "main_thread_self": main_c.most_common(top),
        "inclusive": incl.most_common(top),  # tierswap functions only
    }


# ------------------------------------------------------------------------------ one run


def teardown_checked(be: Backend) -> None:
    """Tear a backend down and say so if any of its swap devices is still active after it."""
    ours = be.swap_names()
    try:
        be.teardown()
    finally:
        left = [n for n in active_swaps() if n in ours]
        if left:
            print(f"WARNING: our swap still active after {be.name}: {', '.join(left)}",
                  file=sys.stderr)


def run_one(be: Backend, args: argparse.Namespace, run_idx: int, *, profile: bool = False,
            stamp: str = "") -> dict[str, Any]:
    """Set up a backend, run the workload in the cgroup, measure, tear everything down."""
    size, limit = args.size_bytes, args.limit_bytes
    phases = "fill,rand" if profile else "fill,seq,rand"
    res: dict[str, Any] = {"backend": be.name, "label": be.label, "run": run_idx,
                           "profile_run": profile, "phases_run": phases}
    print(f"== {be.label}{' (profiling run)' if profile else ''}: run {run_idx + 1}",
          file=sys.stderr, flush=True)
    cg: MemoryCgroup | None = None
    watcher: SwapWatcher | None = None
    wl: subprocess.Popen[str] | None = None
    prof: Profiler | None = None
    hold = Path(tempfile.mkdtemp(prefix="bench-hold-")) / "hold"
    try:
        t_setup = time.monotonic()
        be.setup()
        res["setup_seconds"] = round(time.monotonic() - t_setup, 2)
        res["config"] = be.config()
        if isinstance(be, Tierswap):
            res["tierswap_code"] = tierswap_tree()
        res["swaps"] = active_swaps()
        watcher = SwapWatcher(be.swap_names())
        watcher.start()
        cg_limit = limit if be.swap else size * 2 + (512 << 20)
        cg = MemoryCgroup.create(f"bench-swap-{os.getpid()}", cg_limit)
        res["cgroup_limit"] = cg_limit
        stat_files = be.stat_files()
        dpids = be.daemon_pids()
        snaps: dict[str, Any] = {}

        def mark(tag: str, with_status: bool = True) -> None:
            snaps[tag] = {
                "t": time.monotonic(),
                "cpu": proc_stat_cpu(),
                "blk": {k: read_block_stat(p) for k, p in stat_files.items()},
                "pcpu": {k: pid_cpu(p) for k, p in dpids.items()},
                "io": (be.status()["io"] if with_status and isinstance(be, Tierswap)
                       else None),
                "procs": all_proc_cpu(),
            }

        mark("start")
        if profile and dpids:
            shard_pids = {k: v for k, v in dpids.items() if k.startswith("shard")}
            prof = Profiler(args.py_spy, shard_pids,
                            RESULTS_DIR / f"profile-{stamp}-{be.name}-fill", args.profile_rate,
                            not args.profile_python_only)
        argv = [sys.executable, "-m", "tierswap.workload", "--size", str(size),
                "--seed", str(args.seed), "--phases", phases,
                "--hold-file", str(hold), "--hold-timeout", "1800"]
        res["workload_argv"] = argv[1:]
        wl = run_in_cgroup(cg, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        deadline = time.monotonic() + args.timeout
        while not hold.exists():
            if wl.poll() is not None:
                err = wl.stderr.read() if wl.stderr else ""
                raise BenchError(f"workload exited ({wl.returncode}) before the fill finished: "
                                 f"{err.strip()[-1000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"fill did not finish within {args.timeout:.0f}s")
            time.sleep(0.02)
        if prof is not None:
            res["profile_fill"] = prof.stop()
            prof = None
        mark("hold")
        # ---- pages held: nothing of this is inside a timed phase
        res["swap_used_at_hold"] = {n: active_swaps().get(n, {}).get("used", 0)
                                    for n in be.swap_names()}
        with contextlib.suppress(Exception):
            res["cgroup_swap_bytes"] = cg.swap_bytes()
            res["cgroup_usage_bytes"] = cg.usage_bytes()
        res["backend_stats"] = be.snapshot()
        if be.swap and args.lat_samples > 0:
            targets = [(p, res["swap_used_at_hold"].get(n, 0) // PAGE)
                       for p, n in zip(be.probe_paths(), be.swap_names(), strict=True)]
            res["latency"] = probe_latency(targets, args.lat_samples, args.seed)
            res["latency"]["probe_overhead_us"] = args.probe_overhead_us
            res["latency"]["path"] = ("O_DIRECT pread on the swap file (no block device)"
                                      if be.name == "swapfile" else
                                      "O_DIRECT pread on the swap block device")
        mark("verify")
        if profile and dpids:
            shard_pids = {k: v for k, v in dpids.items() if k.startswith("shard")}
            prof = Profiler(args.py_spy, shard_pids,
                            RESULTS_DIR / f"profile-{stamp}-{be.name}-rand", args.profile_rate,
                            not args.profile_python_only)
        hold.unlink()  # the workload resumes: seq and rand are timed from here
        # wait4 gives the workload's own CPU time (it exec'd in place of the /bin/sh wrapper)
        remaining = max(1.0, deadline + args.timeout - time.monotonic())
        t_wait = time.monotonic()
        while True:
            pid, status, ru = os.wait4(wl.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t_wait > remaining:
                raise BenchError(f"workload did not finish within {remaining:.0f}s after fill")
            time.sleep(0.02)
        wl.returncode = os.waitstatus_to_exitcode(status)
        if prof is not None:
            res["profile_rand"] = prof.stop()
            prof = None
        mark("end")
        out = wl.stdout.read() if wl.stdout else ""
        err = wl.stderr.read() if wl.stderr else ""
        res["workload_rc"] = wl.returncode
        res["workload_cpu"] = {"user": round(ru.ru_utime, 2), "system": round(ru.ru_stime, 2)}
        wl_cpu = {k: snaps[k]["procs"].get(wl.pid) for k in ("hold", "verify")}
        try:
            res["workload"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"workload exit {wl.returncode}, no JSON: {out!r} {err!r}") from None
        if wl.returncode != 0 or not res["workload"].get("ok"):
            res["error"] = f"workload failed verification (exit {wl.returncode}): {err.strip()}"
        res["oom_kills"] = cg.oom_kills()
        # ---- per-phase accounting from the snapshots
        spans = {"fill": ("start", "hold"), "probe": ("hold", "verify"),
                 "verify": ("verify", "end")}
        res["cpu"] = {}
        res["proc_cpu"] = {}
        mine = {os.getpid(), wl.pid, *dpids.values()}
        res["io"] = {}
        res["daemon_cpu"] = {}
        res["daemon_io"] = {}
        for ph, (a, b) in spans.items():
            sa, sb = snaps[a], snaps[b]
            res["cpu"][ph] = cpu_delta(sa["cpu"], sb["cpu"])
            res["cpu"][ph]["wall"] = round(sb["t"] - sa["t"], 2)
            res["proc_cpu"][ph] = proc_cpu_delta(sa["procs"], sb["procs"], mine)
            if ph == "verify" and wl_cpu["verify"] is not None:  # reaped before "end"
                res["proc_cpu"][ph]["ours"] = round(
                    res["proc_cpu"][ph]["ours"] + ru.ru_utime + ru.ru_stime
                    - wl_cpu["verify"][1], 2)
            per = {k: io_delta(sa["blk"][k], sb["blk"][k]) for k in sa["blk"]}
            swapdevs = [v for k, v in per.items() if k != "disk"]
            res["io"][ph] = {"devices": per, "swap_devices": sum_io(swapdevs) if swapdevs
                             else None}
            dcpu = {}
            for k in sa["pcpu"]:
                x, y = sa["pcpu"][k], sb["pcpu"][k]
                dcpu[k] = round(y - x, 2) if x is not None and y is not None else None
            if dcpu:
                dcpu["total"] = round(sum(v for v in dcpu.values() if v is not None), 2)
                res["daemon_cpu"][ph] = dcpu
            if sa["io"] is not None and sb["io"] is not None:
                res["daemon_io"][ph] = {k: sb["io"][k] - sa["io"][k] for k in sa["io"]}
    except BenchError as e:
        res["error"] = str(e)
        return res  # after the finally block below has torn everything down
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if watcher is not None:
            res["foreign_swaps"] = watcher.stop()
            res["contaminated"] = bool(res["foreign_swaps"])
        if prof is not None:
            prof.kill()
        # stop the workload before swapoff (normally it has exited by itself already)
        if wl is not None and wl.poll() is None and cg is None:
            wl.kill()
        if cg is not None:
            try:
                cg.remove()
            except Exception as e:  # report and keep tearing down
                print(f"cgroup removal: {e}", file=sys.stderr)
        if wl is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                wl.wait(timeout=30)
        shutil.rmtree(hold.parent, ignore_errors=True)
        teardown_checked(be)
    return res


# ------------------------------------------------------------------------------ report


def host_info() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    commit = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "ram_bytes": mem,
        "python": platform.python_version(),
        "commit": commit,
        "cgroup": "v1" if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() else "v2",
        "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else None,
        "swappiness_global": Path("/proc/sys/vm/swappiness").read_text().strip(),
        "page_cluster": Path("/proc/sys/vm/page-cluster").read_text().strip(),
    }


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers of one run that the tables show."""
    ph = r.get("workload", {}).get("phases", {})
    bs = r.get("backend_stats", {})
    lat = r.get("latency", {})
    io = r.get("io", {})
    dcpu = r.get("daemon_cpu", {})
    fill_io = (io.get("fill") or {}).get("swap_devices") or {}
    ver_io = (io.get("verify") or {}).get("swap_devices") or {}
    return {
        "fill": ph.get("fill", {}).get("mb_per_s"),
        "seq": ph.get("seq", {}).get("mb_per_s"),
        "rand": ph.get("rand", {}).get("mb_per_s"),
        # the target's definition (issue 9): original bytes / bytes stored, zero pages
        # included on both sides (zram counts same-filled pages in orig_data_size)
        "compression": bs.get("ratio_orig_compr", bs.get("ratio_incl_zero")),
        # like for like: bytes of compressed data only (no allocator overhead)
        "compr_pure": bs.get("ratio_orig_compr", bs.get("compression_ratio")
                             if "ratio_orig_compr" not in bs else None),
        # like for like: memory the allocator holds (zram mem_used_total; tierswap segments)
        "compr_footprint": bs.get("ratio_vs_segments_in_use",
                                  bs.get("compression_ratio")
                                  if "ratio_vs_segments_in_use" not in bs else None),
        "metadata": bs.get("metadata_bytes_per_page"),
        "stored_pages": bs.get("stored_pages"),
        "p50": lat.get("p50_us"),
        "p90": lat.get("p90_us"),
        "p99": lat.get("p99_us"),
        "nz_p50": lat.get("nonzero_p50_us"),
        "zero_reads": (lat.get("zero_page_reads") / lat["samples"]
                       if lat.get("samples") else None),
        "fill_wr_kib": fill_io.get("avg_write_kib"),
        "fill_writes": fill_io.get("writes"),
        "ver_rd_kib": ver_io.get("avg_read_kib"),
        "ver_reads": ver_io.get("reads"),
        "cpu_fill": (r.get("cpu", {}).get("fill") or {}).get("busy"),
        "cpu_verify": (r.get("cpu", {}).get("verify") or {}).get("busy"),
        "dcpu_fill": (dcpu.get("fill") or {}).get("total"),
        "dcpu_verify": (dcpu.get("verify") or {}).get("total"),
        "others_fill": _others(r, "fill"),
        "others_verify": _others(r, "verify"),
        "ok": r.get("workload", {}).get("ok"),
    }


def _others(r: dict[str, Any], phase: str) -> float | None:
    """CPU s of foreign processes seen, plus busy time attributed to nobody (short-lived)."""
    pc = (r.get("proc_cpu") or {}).get(phase)
    busy = ((r.get("cpu") or {}).get(phase) or {}).get("busy")
    if not pc or busy is None:
        return None
    rest = busy - pc["ours"] - pc["kernel_threads"] - pc["others"]
    return round(pc["others"] + max(0.0, rest), 1)


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median over runs per backend (profiling runs excluded)."""
    by: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for r in results:
        if r.get("profile_run") or "workload" not in r:
            continue
        by.setdefault(r["backend"], []).append(metrics(r))
        labels[r["backend"]] = r["label"]
    out: dict[str, dict[str, Any]] = {}
    for b, ms in by.items():
        agg = {k: median([m[k] for m in ms]) for k in ms[0] if k != "ok"}
        agg["ok"] = all(m["ok"] for m in ms)
        agg["runs"] = len(ms)
        agg["label"] = labels[b]
        out[b] = agg
    return out


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _check(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, thr, _ = TARGETS[metric]
    ok = value >= thr if op == ">=" else value <= thr
    return "**pass**" if ok else "**FAIL**"


def render(doc: dict[str, Any]) -> str:
    h = doc["host"]
    p = doc["params"]
    agg = aggregate(doc["results"])
    L: list[str] = []
    L.append("## Benchmark run")
    L.append("")
    L.append(f"- date: {h['date']}; commit `{h['commit']}` at start")
    codes = {json.dumps(r["tierswap_code"], sort_keys=True) for r in doc["results"]
             if r.get("tierswap_code")}
    if codes:
        L.append("- tierswap code per run (HEAD, files changed against it, sources hash): "
                 + "; ".join(f"`{c['head']}` {c['dirty'] or 'clean'} `{c['sources_sha1']}`"
                             for c in map(json.loads, sorted(codes)))
                 + ("" if len(codes) == 1 else " - **the code changed during the run**"))
    L.append(f"- kernel: {h['kernel']} ({h['kernel_version']})")
    L.append(f"- CPU: {h['cpu']}, nproc {h['nproc']}; RAM {h['ram_bytes'] / 2**30:.1f} GiB; "
             f"memory cgroup {h['cgroup']}; THP `{h['thp']}`; vm.swappiness "
             f"{h['swappiness_global']} (cgroup: 100); vm.page-cluster {h['page_cluster']}")
    L.append(f"- workload: `python -m tierswap.workload --size {p['size']} --seed {p['seed']} "
             f"--phases fill,seq,rand --hold-file …` ({p['size_bytes']} bytes, "
             f"{p['size_bytes'] // PAGE} pages, mix {p['mix']}) in a memory cgroup limited to "
             f"{p['limit']} ({p['limit_bytes']} bytes), swappiness 100; runs per backend: "
             f"{p['runs']} (tables show the median)")
    L.append(f"- zram: {p['zram_size']} disksize, {p['zram_algorithm']}; swap file: "
             f"{p['file_size']} in {p['file_dir']} (written with zeros), loop with "
             f"`--direct-io=on`; tierswap: device {p['ts_size']}, shards {p['shards']}, tiers "
             f"memory {p['ts_mem']} + file {p['ts_file']} in {p['file_dir']}, zstd:1; all at "
             f"swap priority {PRIORITY}, one at a time")
    L.append(f"- latency probe: {p['lat_samples']} x 4 KiB O_DIRECT `preadv` at QD1, uniform "
             f"over the swap area in use (pages 1..Used of /proc/swaps) while the workload "
             f"holds its pages; the probe's own cost (same call on /dev/zero) is "
             f"{p['probe_overhead_us']} µs and is included in the numbers")
    L.append("")
    L.append("### Absolute numbers")
    L.append("")
    L.append("| backend | fill MB/s | seq MB/s | rand MB/s | compression (target def.) "
             "| orig / compressed bytes | orig / allocator memory "
             "| metadata B/page | p50 µs | p90 µs | p99 µs | p50 non-zero µs | verified |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
    for _b, m in agg.items():
        L.append(f"| {m['label']} | {_f(m['fill'])} | {_f(m['seq'])} | {_f(m['rand'])} | "
                 f"{_f(m['compression'], 2)} | {_f(m['compr_pure'], 2)} | "
                 f"{_f(m['compr_footprint'], 2)} | "
                 f"{_f(m['metadata'], 1)} | {_f(m['p50'])} | {_f(m['p90'])} | {_f(m['p99'])} | "
                 f"{_f(m['nz_p50'])} | {'yes' if m['ok'] else '**NO**'} |")
    L.append("")
    L.append("compression (target definition): original bytes / bytes stored, zero pages "
             "included on both sides: zram `orig_data_size / compr_data_size`, tierswap "
             "(stored + zero pages) x 4096 / live compressed bytes. The two like-for-like "
             "columns: *orig / compressed bytes* "
             "is zram `orig_data_size / compr_data_size` and tierswap `compression_ratio`; "
             "*orig / allocator memory* is zram `orig_data_size / mem_used_total` and, for "
             "tierswap, the same pages over the 1 MiB segments in use (partly filled and "
             "fragmented segments included; the pre-grown but empty RAM arena is not). "
             "p50 non-zero: only the probe reads that returned a non-zero page.")
    L.append("")
    L.append("### I/O shape and CPU")
    L.append("")
    L.append("| backend | fill: writes | avg write KiB | verify: reads | avg read KiB "
             "| zero-page probe reads | CPU s fill (system) | CPU s verify (system) "
             "| daemon CPU s fill | daemon CPU s verify | others' CPU s fill / verify |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _b, m in agg.items():
        zr = f"{m['zero_reads'] * 100:.0f}%" if m["zero_reads"] is not None else "-"
        L.append(f"| {m['label']} | {_f(m['fill_writes'])} | {_f(m['fill_wr_kib'])} | "
                 f"{_f(m['ver_reads'])} | {_f(m['ver_rd_kib'])} | {zr} | "
                 f"{_f(m['cpu_fill'])} | {_f(m['cpu_verify'])} | {_f(m['dcpu_fill'])} | "
                 f"{_f(m['dcpu_verify'])} | {_f(m['others_fill'])} / {_f(m['others_verify'])} |")
    L.append("")
    L.append("writes/reads: requests seen by the swap block device(s) (`/sys/block/X/stat` "
             "before and after the phase; for the direct swap file there is no device of its "
             "own). CPU s: busy CPU seconds of the whole VM (`/proc/stat`, 2 CPUs) during the "
             "phase; daemon CPU: utime+stime of the tierswap supervisor and shard processes; "
             "others' CPU: processes that are not part of the benchmark (this VM is shared) "
             "plus busy time no process accounts for (short-lived processes; per-process and "
             "/proc/stat accounting also differ by a few per cent); `proc_cpu` in the raw JSON "
             "says who.")
    L.append("")
    zram = agg.get("zram")
    ts = {b: m for b, m in agg.items() if b.startswith("tierswap")}
    L.append("### tierswap vs zram")
    L.append("")
    if zram is None or not ts:
        L.append("(needs both a zram and a tierswap result)")
    else:
        names = list(ts)
        L.append("| metric | target | zram | " + " | ".join(
            f"{ts[n]['label']} | ratio | pass" for n in names) + " |")
        L.append("|---|---|---:|" + "---:|---:|:-:|" * len(names))
        for key, mk in (("fill", "fill"), ("seq", "seq"), ("rand", "rand"),
                        ("compression", "compression")):
            op, thr, desc = TARGETS[key]
            row = f"| {desc} | {op} {thr}x | {_f(zram[mk], 2 if key == 'compression' else 1)} |"
            for n in names:
                v = ts[n][mk]
                ratio = v / zram[mk] if v is not None and zram[mk] else None
                row += (f" {_f(v, 2 if key == 'compression' else 1)} | {_f(ratio, 2)}x | "
                        f"{_check(key, ratio)} |")
            L.append(row)
        for key, mk in (("metadata", "metadata"), ("p50", "p50")):
            op, thr, desc = TARGETS[key]
            row = f"| {desc} | {op} {thr:g} | {_f(zram[mk])} |"
            for n in names:
                v = ts[n][mk]
                row += f" {_f(v)} | - | {_check(key, v)} |"
            L.append(row)
        for mk, desc in (("compr_pure", "reference: orig / compressed bytes, both"),
                         ("compr_footprint", "reference: orig / allocator memory, both")):
            row = f"| {desc} | - | {_f(zram[mk], 2)} |"
            for n in names:
                v = ts[n][mk]
                ratio = v / zram[mk] if v is not None and zram[mk] else None
                row += f" {_f(v, 2)} | {_f(ratio, 2)}x | - |"
            L.append(row)
    profs = [r for r in doc["results"] if r.get("profile_run")]
    if profs:
        L.append("")
        L.append("### Profiles (py-spy, separate run, not in the tables)")
        for r in profs:
            for phase in ("fill", "rand"):
                pr = r.get(f"profile_{phase}") or {}
                for shard, s in pr.items():
                    L.append("")
                    L.append(f"**{r['label']}, {shard}, {phase} phase** — {s.get('samples', 0)} "
                             f"samples over {s.get('seconds')} s at {s.get('rate_hz')} Hz "
                             f"(non-idle samples / possible = {s.get('busy_fraction')}); "
                             f"threads: {s.get('threads')}; raw: `{s.get('file')}`")
                    L.append("")
                    L.append("| main (trio) thread: self samples | leaf frame (native included) "
                             "| | all threads: inclusive samples | tierswap function |")
                    L.append("|---:|---|---|---:|---|")
                    for a, b in zip(s.get("main_thread_self", [])[:12],
                                    s.get("inclusive", [])[:12], strict=False):
                        L.append(f"| {a[1]} | `{a[0]}` | | {b[1]} | `{b[0]}` |")
    errs = [r for r in doc["results"] if r.get("error")]
    if errs:
        L.append("")
        L.append("### Errors")
        for r in errs:
            L.append(f"- {r['label']} run {r['run'] + 1}: {r['error']}")
    L.append("")
    L.append("<details><summary>raw JSON</summary>")
    L.append("")
    L.append("```json")
    L.append(json.dumps(_strip_raw(doc), indent=1, sort_keys=False))
    L.append("```")
    L.append("</details>")
    L.append("")
    return "\n".join(L)


def _strip_raw(doc: dict[str, Any]) -> dict[str, Any]:
    """Raw JSON for the report, without the bulky hardening lists of every status call."""
    d = json.loads(json.dumps(doc))
    for r in d["results"]:
        st = (r.get("backend_stats") or {}).get("status")
        if st:
            st.pop("hardening", None)
    return d


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="workload size (default 1G)")
    ap.add_argument("--limit", default="256M", help="memory cgroup limit (default 256M)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", default=DEFAULT_ONLY,
                    help=f"comma list of {','.join(BACKENDS)} (default {DEFAULT_ONLY})")
    ap.add_argument("--shards", default="1,2", help="tierswap shard counts to run (default 1,2)")
    ap.add_argument("--zram-algorithm", default="lzo-rle")
    ap.add_argument("--zram-size", default="4G")
    ap.add_argument("--file-size", default="4G")
    ap.add_argument("--file-dir", default="/var/tmp")
    ap.add_argument("--ts-size", default="4G")
    ap.add_argument("--ts-mem", default="2G")
    ap.add_argument("--ts-file", default="4G")
    ap.add_argument("--lat-samples", type=int, default=3000)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per workload phase")
    ap.add_argument("--profile", action="store_true",
                    help="extra tierswap run (first --shards value, phases fill,rand) under "
                         "py-spy record; not part of the tables")
    ap.add_argument("--profile-rate", type=int, default=100)
    ap.add_argument("--profile-python-only", action="store_true",
                    help="py-spy without --native (no C/Cython frames)")
    ap.add_argument("--ts-wbt-off", action="store_true",
                    help="also run tierswap (first --shards value) with writeback throttling "
                         "disabled on its loop devices (wbt_lat_usec=0; tierswap does this "
                         "itself since 27bbb57, so there it is just a repeat run)")
    ap.add_argument("--wait-exclusive", type=float, default=0.0,
                    help="seconds to wait for other swap devices to go before each backend "
                         "(default 0: refuse at once)")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-runs of a backend when another swap device appeared meanwhile")
    ap.add_argument("--out", default=None, help="markdown report path (default: stdout)")
    ap.add_argument("--from-json", default=None, help="re-render a report from raw results")
    args = ap.parse_args(argv)

    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        for r in doc["results"]:  # re-summarise saved py-spy output (e.g. after changes here)
            for key in ("profile_fill", "profile_rand"):
                for shard, sm in (r.get(key) or {}).items():
                    f = REPO / sm.get("file", "")
                    if sm.get("file") and f.is_file():
                        r[key][shard] = summarize_profile(f, sm["seconds"], sm["rate_hz"])
        text = render(doc)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
        return 0

    if os.geteuid() != 0:
        print("bench_swap: must run as root (swapon, losetup, zram, cgroups)", file=sys.stderr)
        return 2
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in BACKENDS]
    if bad:
        print(f"bench_swap: unknown backend(s) {bad}; known: {', '.join(BACKENDS)}",
              file=sys.stderr)
        return 2
    args.size_bytes = parse_size(args.size)
    args.limit_bytes = parse_size(args.limit)
    shards = [int(x) for x in args.shards.split(",") if x.strip()]
    cli = REPO / ".venv" / "bin" / "tierswap"
    cli_argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "tierswap"]
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.profile and not Path(args.py_spy).exists():
        print("bench_swap: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    file_dir = Path(args.file_dir)

    try:
        wait_exclusive(args.wait_exclusive, "at start")
    except BenchError as e:
        print(f"bench_swap: {e}", file=sys.stderr)
        return 1
    fuse = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
            if ln.split()[2].startswith("fuse.tierswap")]
    if fuse:
        print(f"bench_swap: tierswap FUSE mounts are active ({', '.join(fuse)}); refusing",
              file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGINT, _on_sigint)

    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.probe_overhead_us = probe_overhead()
    from tierswap.workload import normalise_mix

    doc: dict[str, Any] = {
        "host": host_info(),
        "params": {
            "size": args.size, "size_bytes": args.size_bytes, "limit": args.limit,
            "limit_bytes": args.limit_bytes, "seed": args.seed, "runs": args.runs,
            "only": only, "shards": shards, "mix": normalise_mix(None),
            "zram_size": args.zram_size, "zram_algorithm": args.zram_algorithm,
            "file_size": args.file_size, "file_dir": args.file_dir,
            "ts_size": args.ts_size, "ts_mem": args.ts_mem, "ts_file": args.ts_file,
            "lat_samples": args.lat_samples, "probe_overhead_us": args.probe_overhead_us,
            "argv": sys.argv[1:],
        },
        "results": [],
        "discarded": [],
    }
    raw_path = RESULTS_DIR / f"bench-swap-{stamp}.json"

    def backends() -> list[Backend]:
        out: list[Backend] = []
        for name in only:
            if name == "baseline":
                out.append(Baseline())
            elif name == "zram":
                out.append(Zram(parse_size(args.zram_size), args.zram_algorithm))
            elif name in ("file", "swapfile"):
                out.append(FileSwap(parse_size(args.file_size), file_dir, name == "file"))
            elif name == "tierswap":
                for s in shards:
                    out.append(Tierswap(s, parse_size(args.ts_size), parse_size(args.ts_mem),
                                        parse_size(args.ts_file), file_dir, cli_argv))
                if args.ts_wbt_off:
                    out.append(Tierswap(shards[0], parse_size(args.ts_size),
                                        parse_size(args.ts_mem), parse_size(args.ts_file),
                                        file_dir, cli_argv, wbt_off=True))
        return out

    rc = 0
    t_all = time.monotonic()
    try:
        plan: list[tuple[Backend, int, bool]] = [
            (be, i, False) for i in range(args.runs) for be in backends()]
        if args.profile and "tierswap" in only:
            plan.append((Tierswap(shards[0], parse_size(args.ts_size), parse_size(args.ts_mem),
                                  parse_size(args.ts_file), file_dir, cli_argv), 0, True))
        for be, i, prof in plan:
            for attempt in range(args.retries + 1):
                if be.swap:
                    waited = wait_exclusive(args.wait_exclusive, f"before {be.name}")
                else:
                    waited = 0.0
                t0 = time.monotonic()
                r = run_one(be, args, i, profile=prof, stamp=stamp)
                r["attempt"] = attempt
                r["waited_for_exclusive_s"] = waited
                r["wall_seconds"] = round(time.monotonic() - t0, 1)
                m = metrics(r)
                print(f"   fill {m['fill']} seq {m['seq']} rand {m['rand']} MB/s, ratio "
                      f"{_f(m['compression'], 2)}, p50 {m['p50']} µs, ok {m['ok']} "
                      f"({r['wall_seconds']} s){' ERROR ' + r['error'] if r.get('error') else ''}"
                      f"{' CONTAMINATED by ' + str(r['foreign_swaps']) if r.get('contaminated') else ''}",  # noqa: E501
                      file=sys.stderr, flush=True)
                if r.get("contaminated") and attempt < args.retries:
                    doc["discarded"].append(r)  # kept for the record, not in the tables
                    raw_path.write_text(json.dumps(doc, indent=1))
                    continue
                doc["results"].append(r)
                raw_path.write_text(json.dumps(doc, indent=1))
                if r.get("error"):
                    rc = 1
                break
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench_swap: interrupted ({type(e).__name__} {e}); everything torn down",
              file=sys.stderr)
        rc = 130
    doc["total_seconds"] = round(time.monotonic() - t_all, 1)
    raw_path.write_text(json.dumps(doc, indent=1))
    print(f"raw results: {raw_path}", file=sys.stderr)
    text = render(doc)
    if args.out:
        Path(args.out).write_text(text)
        print(f"report: {args.out}", file=sys.stderr)
    else:
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
