"""`tierswap bench`: zram and tierswap side by side on this machine, with a verifying workload.

Each backend in turn: set it up, run `python -m tierswap.workload` (fill, then sequential and
random verify of every page) in a memory cgroup a quarter of the workload's size so most pages
go through swap, read compression statistics and probe 4 KiB read latency while the pages are
held, then tear everything down. The result is a table of tierswap / zram ratios on stdout,
`bench.json` and (with matplotlib, the `[bench]` extra) `bench.png` in the output directory.

Limits and rules:
* root only (swapon, zram, cgroups, FUSE). zram is used when the kernel has it
  (/sys/class/zram-control, or after `modprobe zram`, which is undone at the end); without it
  only tierswap runs and the ratios are "-".
* One device at a time, ours alone: with another swap device active it refuses (exit 1, one
  line) unless --yes; then our devices get the highest priority but pages may still land on
  the other one, and the JSON says which devices were active.
* tierswap runs as a private instance (its own config, state and run directory and tier file
  under a fresh directory in /var/tmp); an instance the operator runs is never touched.
* Every path, including Ctrl-C, SIGTERM and SIGHUP, kills the workload, removes the cgroup,
  swapoffs and resets zram and takes the private tierswap instance down. Teardown commands run
  in their own session, so a second Ctrl-C does not kill them half-way; further signals are
  ignored until teardown is done.
* One run of each, on a machine that may be busy: the numbers say how this machine does now,
  not a statistic (tests/benchmarks/bench_swap.py does repeated runs and more backends).
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tierswap import system
from tierswap.benchlib import (
    PAGE,
    BenchError,
    private_config_text,
    probe_latency,
    probe_overhead,
    tierswap_ratio_incl_zero,
    zram_snapshot,
)
from tierswap.cgroup import CgroupError, MemoryCgroup, run_in_cgroup
from tierswap.config import format_size, parse_size
from tierswap.errors import ConfigError, TierswapError

PRIORITY = 32767  # the highest: with --yes and another device active, ours is used first
MIN_SIZE = 64 << 20
MIN_LIMIT = 48 << 20  # the workload's interpreter and numpy need ~30 MiB of their own
LAT_SAMPLES = 2000
SEED = 1
PHASE_TIMEOUT = 1800.0
ZRAM_CONTROL = Path("/sys/class/zram-control")
# metric -> (label in the table, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "fill": ("fill MB/s (swap-out)", True),
    "seq": ("seq verify MB/s (swap-in)", True),
    "rand": ("rand verify MB/s (swap-in)", True),
    "compression": ("compression (orig / compressed)", True),
    "p50": ("4 KiB read p50 µs (lower is better)", False),
}


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds through every finally block as KeyboardInterrupt does."""


class UsageError(BenchError):
    """Bad arguments (exit 2 through the CLI)."""


# ---------------------------------------------------------------------------- helpers


def run_cmd(argv: list[str], timeout: float = 120.0, check: bool = True) -> str:
    """Run a command in its own session (a Ctrl-C on the terminal reaches us, not it)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           start_new_session=True)
    except FileNotFoundError:
        raise BenchError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise BenchError(f"{' '.join(argv)}: {err[-1] if err else f'exit {p.returncode}'}")
    return p.stdout


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def other_swaps() -> list[str]:
    return list(system.active_swaps())


def host_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("tierswap")
    except PackageNotFoundError:  # run from a checkout that is not installed
        ver = "?"
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "kernel": platform.release(), "nproc": os.cpu_count(),
            "python": platform.python_version(), "tierswap": ver,
            "mem_available_bytes": mem_available()}


# ---------------------------------------------------------------------------- backends


class Backend(Protocol):
    name: str
    label: str

    def setup(self) -> None: ...

    def devices(self) -> list[str]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def teardown(self) -> list[str]: ...


class Zram:
    """A zram device of our own (hot_add), reset and removed at the end."""

    name = "zram"

    def __init__(self, size: int) -> None:
        self.disksize = 2 * size
        self.label = "zram"
        self.dev: str | None = None
        self.loaded_module = False
        self.algorithm = "?"

    @staticmethod
    def available() -> str | None:
        """None when zram can be used (setup loads the module if needed), else why not."""
        if ZRAM_CONTROL.exists():
            return None
        try:
            run_cmd(["modprobe", "--dry-run", "zram"], timeout=60)
        except BenchError as e:
            return f"the kernel has no zram module ({e})"
        return None

    def setup(self) -> None:
        if not ZRAM_CONTROL.exists():
            run_cmd(["modprobe", "zram", "num_devices=0"], timeout=60)
            self.loaded_module = True
            if not ZRAM_CONTROL.exists():
                raise BenchError(f"modprobe zram: no {ZRAM_CONTROL} (kernel older than 4.2?)")
        n = int((ZRAM_CONTROL / "hot_add").read_text())
        self.dev = f"/dev/zram{n}"
        sysdir = self.sysdir
        alg = (sysdir / "comp_algorithm").read_text().split()
        self.algorithm = next((a.strip("[]") for a in alg if a.startswith("[")), "?")
        self.label = f"zram ({self.algorithm})"
        (sysdir / "disksize").write_text(str(self.disksize))
        if not system.wait_for(lambda: os.path.exists(self.dev or ""), 10):
            raise BenchError(f"{self.dev} did not appear")
        run_cmd(["mkswap", self.dev])
        run_cmd(["swapon", "--priority", str(PRIORITY), self.dev])

    @property
    def sysdir(self) -> Path:
        assert self.dev is not None
        return Path("/sys/block") / Path(self.dev).name

    def devices(self) -> list[str]:
        return [self.dev] if self.dev else []

    def snapshot(self) -> dict[str, Any]:
        snap = zram_snapshot(self.sysdir)
        return {"compression": snap["ratio_orig_compr"], "stats": snap,
                "config": {"disksize": self.disksize, "algorithm": self.algorithm}}

    def teardown(self) -> list[str]:
        problems: list[str] = []
        if self.dev is not None:
            name = Path(self.dev).name
            try:
                if self.dev in system.active_swaps():
                    run_cmd(["swapoff", self.dev], timeout=PHASE_TIMEOUT)
                (self.sysdir / "reset").write_text("1")
                (ZRAM_CONTROL / "hot_remove").write_text(name.removeprefix("zram"))
            except (BenchError, OSError) as e:
                problems.append(f"zram {self.dev}: {e}")
            else:
                self.dev = None
        if self.loaded_module and self.dev is None:
            with contextlib.suppress(BenchError):
                run_cmd(["modprobe", "-r", "zram"], timeout=60)
            self.loaded_module = False
        return problems


class Tierswap:
    """A private tierswap instance under a fresh directory in /var/tmp."""

    name = "tierswap"
    label = "tierswap"

    def __init__(self, size: int, cli: list[str] | None = None) -> None:
        self.device_size = 2 * size
        self.memory_capacity = size
        self.file_capacity = max(64 << 20, size // 4)
        self.cli = cli or [sys.executable, "-m", "tierswap"]
        self.base: Path | None = None
        self.loops: list[str] = []

    @property
    def config_path(self) -> Path:
        assert self.base is not None
        return self.base / "tierswap.toml"

    def config_text(self) -> str:
        assert self.base is not None
        return private_config_text(
            state_dir=self.base / "state", run_dir=self.base / "run",
            tier_file=self.base / "state" / "disk.tier", device_size=self.device_size,
            memory_capacity=self.memory_capacity, file_capacity=self.file_capacity,
            priority=PRIORITY)

    def setup(self) -> None:
        # not under /tmp: keep the FUSE mount path short and off tmpfs (like the tests)
        self.base = Path(tempfile.mkdtemp(prefix="tierswap-bench-", dir="/var/tmp"))
        free = shutil.disk_usage(self.base).free
        if free < self.file_capacity + (256 << 20):
            raise BenchError(f"{self.base}: {format_size(free)} free, the file tier needs "
                             f"{format_size(self.file_capacity)} and some room")
        self.config_path.write_text(self.config_text())
        argv = [*self.cli, "up", "--config", str(self.config_path)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise BenchError("tierswap up: not ready after 300 s") from None
        except BaseException:
            # Ctrl-C meanwhile: let `up` finish (ready or failed) rather than kill it, so that
            # the daemon it started is registered when teardown's `down` looks for it
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=300)
            raise
        if p.returncode != 0:
            lines = (err or out).strip().splitlines()
            raise BenchError(f"tierswap up: {lines[-1] if lines else f'exit {p.returncode}'}")
        self.loops = out.split()

    def devices(self) -> list[str]:
        return list(self.loops)

    def status(self) -> dict[str, Any]:
        out = run_cmd([*self.cli, "status", "--json", "--config", str(self.config_path)],
                      timeout=60)
        st: dict[str, Any] = json.loads(out)
        return st

    def snapshot(self) -> dict[str, Any]:
        st = self.status()
        return {"compression": tierswap_ratio_incl_zero(st),
                "stats": {"pages": st.get("pages"), "stored_bytes": st.get("stored_bytes"),
                          "compression_ratio": st.get("compression_ratio"),
                          "metadata_bytes_per_page": st.get("metadata_bytes_per_page")},
                "config": {"device_size": self.device_size,
                           "memory_capacity": self.memory_capacity,
                           "file_capacity": self.file_capacity, "shards": 1}}

    def leftovers(self) -> list[str]:
        if self.base is None:
            return []
        run_dir = self.base / "run"
        left = [f"swap {d}" for d in self.loops if d in system.active_swaps()]
        left += [f"loop {d}" for d in system.loops_backed_by(run_dir)]
        left += [f"mount {m}" for m in system.fuse_mounts_under(run_dir)]
        return left

    def teardown(self) -> list[str]:
        if self.base is None:
            return []
        cfg = str(self.config_path)
        problems: list[str] = []
        if self.config_path.exists():
            try:
                run_cmd([*self.cli, "down", "--quiet", "--config", cfg], timeout=PHASE_TIMEOUT)
            except BenchError as e:
                problems.append(str(e))
            if problems or self.leftovers():
                try:
                    run_cmd([*self.cli, "down", "--force", "--quiet", "--config", cfg],
                            timeout=PHASE_TIMEOUT)
                except BenchError as e:
                    problems.append(str(e))
        left = self.leftovers()
        if left:  # never delete files under a live device: that loses its pages
            return [f"tierswap instance {self.base}: left behind: {', '.join(left)}"]
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None
        self.loops = []
        return []


# ---------------------------------------------------------------------------- progress


class Progress:
    """A bar on a terminal (rich), one line per stage otherwise; `weights` sum to one backend."""

    STAGES = {"setup": 1, "fill": 4, "probe": 1, "verify": 4, "teardown": 1}

    def __init__(self, backends: int, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total = backends * sum(self.STAGES.values())
        self.done = 0.0
        self.cur = 0.0
        self._bar: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        if not self.tty:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        with Bar(TextColumn("{task.description:<28}"), BarColumn(),
                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=True) as bar:
            self._bar = bar
            self._task = bar.add_task("starting", total=self.total)
            try:
                yield self
            finally:
                self._bar = None

    def stage(self, backend: str, stage: str) -> None:
        """Enter `stage` of `backend`: the previous stage counts as done."""
        self.done += self.cur
        self.cur = float(self.STAGES[stage])
        if self._bar is not None:
            self._bar.update(self._task, description=f"{backend}: {stage}", completed=self.done)
        else:
            print(f"bench: {backend}: {stage}", file=sys.stderr, flush=True)

    def fraction(self, f: float) -> None:
        """How far into the current stage (0..1), when it can be measured."""
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.cur * min(1.0, max(0.0, f)))

    def finish_backend(self) -> None:
        self.done += self.cur
        self.cur = 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)


# ---------------------------------------------------------------------------- one backend


def run_backend(be: Backend, size: int, limit: int, progress: Progress,
                overhead_us: float) -> dict[str, Any]:
    """Set `be` up, run the workload against it, measure, and tear it down on every path."""
    res: dict[str, Any] = {"backend": be.name, "label": be.label}
    cg: MemoryCgroup | None = None
    wl: subprocess.Popen[str] | None = None
    hold_dir = Path(tempfile.mkdtemp(prefix="tierswap-bench-hold-"))
    hold = hold_dir / "hold"
    try:
        progress.stage(be.name, "setup")
        be.setup()
        res["label"] = be.label
        res["devices"] = be.devices()
        res["swaps_at_start"] = system.active_swaps()
        cg = MemoryCgroup.create(f"tierswap-bench-{os.getpid()}", limit)
        argv = [sys.executable, "-m", "tierswap.workload", "--size", str(size), "--seed",
                str(SEED), "--phases", "fill,seq,rand", "--hold-file", str(hold),
                "--hold-timeout", str(int(PHASE_TIMEOUT))]
        progress.stage(be.name, "fill")
        wl = run_in_cgroup(cg, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not hold.exists():
            if wl.poll() is not None:
                err = wl.stderr.read() if wl.stderr else ""
                raise BenchError(f"{be.name}: workload exited ({wl.returncode}) during fill: "
                                 f"{err.strip()[-300:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{be.name}: fill did not finish in {PHASE_TIMEOUT:.0f}s")
            with contextlib.suppress(CgroupError, ValueError):
                progress.fraction((cg.usage_bytes() + cg.swap_bytes()) / size)
            time.sleep(0.05)
        progress.stage(be.name, "probe")  # pages held: nothing here is in a timed phase
        used = system.active_swaps()
        res["swap_used_at_hold"] = {d: used.get(d, {}).get("used", 0) for d in be.devices()}
        res.update(be.snapshot())
        res["latency"] = probe_latency(
            [(d, n // PAGE) for d, n in res["swap_used_at_hold"].items()], LAT_SAMPLES, SEED)
        res["latency"]["probe_overhead_us"] = overhead_us
        progress.stage(be.name, "verify")
        hold.unlink()
        try:
            out, err = wl.communicate(timeout=2 * PHASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{be.name}: verify did not finish in {2 * PHASE_TIMEOUT:.0f}s") from None
        try:
            res["workload"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"{be.name}: workload exit {wl.returncode}, no result: "
                             f"{err.strip()[-300:]}") from None
        res["workload_rc"] = wl.returncode
        with contextlib.suppress(CgroupError):
            res["oom_kills"] = cg.oom_kills()
        if not res["workload"].get("ok"):
            res["error"] = (f"{be.name}: {res['workload'].get('bad_pages')} page(s) failed "
                            "verification")
    except (TierswapError, CgroupError, OSError) as e:  # this backend failed: say so, go on
        res["error"] = f"{be.name}: {e}"
    finally:
        progress.stage(be.name, "teardown")
        problems: list[str] = []
        if cg is not None:  # the workload goes first: swapoff would pull its pages back in
            try:
                cg.remove()
            except CgroupError as e:
                problems.append(str(e))
        if wl is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                wl.kill()
                wl.wait(timeout=30)
            for pipe in (wl.stdout, wl.stderr):
                if pipe is not None:
                    pipe.close()
        shutil.rmtree(hold_dir, ignore_errors=True)
        problems += be.teardown()
        progress.finish_backend()
        if problems:
            res["teardown_problems"] = problems
            for p in problems:
                print(f"tierswap: bench: teardown: {p}", file=sys.stderr)
    return res


# ---------------------------------------------------------------------------- results


def metrics(r: dict[str, Any] | None) -> dict[str, float | None]:
    """The numbers the table compares, from one backend's result (None when missing)."""
    r = r or {}
    ph = (r.get("workload") or {}).get("phases") or {}
    return {"fill": (ph.get("fill") or {}).get("mb_per_s"),
            "seq": (ph.get("seq") or {}).get("mb_per_s"),
            "rand": (ph.get("rand") or {}).get("mb_per_s"),
            "compression": r.get("compression"),
            "p50": (r.get("latency") or {}).get("p50_us")}


def ratios(doc: dict[str, Any]) -> dict[str, float | None]:
    """tierswap / zram for every metric; None where either side is missing or zero."""
    z, t = metrics(doc["backends"].get("zram")), metrics(doc["backends"].get("tierswap"))
    out: dict[str, float | None] = {}
    for k in METRICS:
        a, b = t[k], z[k]
        out[k] = round(a / b, 3) if a is not None and b else None
    return out


def verified(r: dict[str, Any] | None) -> bool:
    w = (r or {}).get("workload") or {}
    return bool(w.get("ok")) and w.get("bad_pages") == 0


def _fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, zram, tierswap, tierswap / zram) rows of the summary table."""
    z, t = metrics(doc["backends"].get("zram")), metrics(doc["backends"].get("tierswap"))
    rt = doc.get("ratios") or ratios(doc)
    rows = []
    for k, (label, _higher) in METRICS.items():
        nd = 2 if k == "compression" else 1
        rows.append((label, _fmt(z[k], nd), _fmt(t[k], nd),
                     "-" if rt[k] is None else f"{rt[k]:.2f}x"))
    zb, tb = doc["backends"].get("zram"), doc["backends"].get("tierswap")
    rows.append(("every page verified",
                 "-" if zb is None else ("yes" if verified(zb) else "NO"),
                 "-" if tb is None else ("yes" if verified(tb) else "NO"), ""))
    return rows


def render_table(doc: dict[str, Any], width: int = 100) -> str:
    """The table as text (rich), as printed on stdout."""
    from rich.console import Console
    from rich.table import Table

    zlabel = (doc["backends"].get("zram") or {}).get("label", "zram")
    tab = Table(title=f"tierswap bench, {doc['params']['size']} workload: tierswap / zram")
    tab.add_column("metric")
    tab.add_column(zlabel, justify="right")
    tab.add_column("tierswap", justify="right")
    tab.add_column("tierswap / zram", justify="right")
    for row in table_rows(doc):
        tab.add_row(*row)
    con = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        con.print(tab)
        text = con.export_text()
    finally:
        con.file.close()
    notes = [f"zram skipped: {doc['zram_skipped']}"] if doc.get("zram_skipped") else []
    notes += [f"{name}: {r['error']}" for name, r in doc["backends"].items() if r.get("error")]
    return text + "".join(f"{n}\n" for n in notes)


def write_chart(doc: dict[str, Any], path: Path) -> str | None:
    """bench.png: absolute throughput of both and the ratios; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    z, t = metrics(doc["backends"].get("zram")), metrics(doc["backends"].get("tierswap"))
    rt = doc["ratios"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = ["fill", "seq", "rand"]
    xs = range(len(keys))
    ax1.bar([x - 0.2 for x in xs], [z[k] or 0 for k in keys], 0.4, label="zram")
    ax1.bar([x + 0.2 for x in xs], [t[k] or 0 for k in keys], 0.4, label="tierswap")
    ax1.set_xticks(list(xs), keys)
    ax1.set_ylabel("MB/s")
    ax1.set_title("throughput (higher is better)")
    ax1.legend()
    rkeys = list(METRICS)
    ax2.bar(range(len(rkeys)), [rt[k] or 0 for k in rkeys], 0.6, color="tab:orange")
    ax2.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    ax2.set_xticks(range(len(rkeys)), ["fill", "seq", "rand", "compr.", "p50 lat."])
    ax2.set_title("tierswap / zram (p50: lower is better)")
    fig.suptitle(f"tierswap bench, {doc['params']['size']}, {doc['host']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_outputs(doc: dict[str, Any], out: Path) -> list[str]:
    """bench.json and bench.png in `out`; returns the lines to print about them."""
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"results: {out / 'bench.json'}"]
    chart = write_chart(doc, out / "bench.png")
    lines.append(f"chart: {chart}" if chart else
                 "chart skipped: matplotlib is not installed (pip install 'tierswap[bench]')")
    return lines


# ---------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1G", help="workload size (default 1G; at least 64M)")
    p.add_argument("--out", default=None,
                   help="directory for bench.json and bench.png "
                        "(default ./tierswap-bench-<date>)")
    p.add_argument("--yes", "--force", dest="yes", action="store_true",
                   help="run even though another swap device is active")


def check_args(args: argparse.Namespace) -> tuple[int, Path]:
    """Size and output directory, checked before anything is set up."""
    try:
        size = parse_size(args.size, "--size")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if size < MIN_SIZE or size % PAGE:
        raise UsageError(f"--size must be at least {format_size(MIN_SIZE)} and a multiple of "
                         f"4 KiB, got {args.size}")
    out = Path(args.out) if args.out else Path(
        f"tierswap-bench-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    return size, out


def preflight(size: int, yes: bool) -> list[str]:
    """Refusals that need the machine: root, other swap devices, memory. Returns the swaps."""
    if os.geteuid() != 0:
        raise BenchError("bench must run as root (swapon, zram, memory cgroups, FUSE)")
    swaps = other_swaps()
    if swaps and not yes:
        raise BenchError(f"another swap device is active ({', '.join(swaps)}): it would take "
                         "part in the measurement; swapoff it or pass --yes")
    avail = mem_available()
    if avail < 2 * size:  # both backends keep compressed pages in RAM, plus the cgroup's share
        raise BenchError(f"--size {format_size(size)} needs about {format_size(2 * size)} of "
                         f"available memory, this machine has {format_size(avail)}")
    return swaps


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise once (so finally blocks run), then are ignored."""
    stopping = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_all(backends: list[Backend], size: int, limit: int,
            progress: Progress) -> dict[str, dict[str, Any]]:
    overhead = probe_overhead()
    out: dict[str, dict[str, Any]] = {}
    with progress.shown():
        for be in backends:
            out[be.name] = run_backend(be, size, limit, progress, overhead)
    return out


def main(args: argparse.Namespace,
         make_backends: Callable[[int], tuple[list[Backend], str | None]] | None = None) -> int:
    """`tierswap bench`; `make_backends` stands in for the real backends in unit tests."""
    size, out = check_args(args)
    swaps = preflight(size, args.yes)
    limit = max(MIN_LIMIT, size // 4)
    doc: dict[str, Any] = {
        "host": host_info(),
        "params": {"size": format_size(size), "size_bytes": size, "cgroup_limit_bytes": limit,
                   "seed": SEED, "latency_samples": LAT_SAMPLES, "priority": PRIORITY,
                   "other_swaps_at_start": swaps},
        "backends": {},
    }
    with signals_unwind():
        backends, skipped = (make_backends or default_backends)(size)
        if skipped:
            doc["zram_skipped"] = skipped
            print(f"tierswap: bench: zram skipped: {skipped}", file=sys.stderr)
        t0 = time.monotonic()
        try:
            doc["backends"] = run_all(backends, size, limit, Progress(len(backends)))
        except (KeyboardInterrupt, Interrupted):
            print("tierswap: bench: interrupted; everything it set up was removed",
                  file=sys.stderr)
            return 130
        doc["seconds"] = round(time.monotonic() - t0, 1)
    doc["ratios"] = ratios(doc)
    out.mkdir(parents=True, exist_ok=True)
    print(render_table(doc), end="")
    for line in write_outputs(doc, out):
        print(line)
    errors = [r["error"] for r in doc["backends"].values() if r.get("error")]
    errors += [p for r in doc["backends"].values() for p in r.get("teardown_problems", [])]
    if errors:
        raise BenchError("; ".join(errors))
    return 0


def default_backends(size: int) -> tuple[list[Backend], str | None]:
    skipped = Zram.available()
    backends: list[Backend] = [] if skipped else [Zram(size)]
    backends.append(Tierswap(size))
    return backends, skipped
