"""Measurement pieces shared by `tierswap bench` and tests/benchmarks/bench_swap.py.

Both compare swap backends with the same verifying workload; what they must measure the same
way lives here: the 4 KiB queue-depth-1 read latency probe on a swap device, zram's compression
statistics, and the private configuration of a benchmark's own tierswap instance.

Limits: the probe reads with O_DIRECT from the swap block device, which measures the device's
read path (FUSE round trip, decompression) but not the kernel's swap-in around it; reads of
slots never written return zero pages without reaching the device on recent kernels (6.12+
keeps zero pages in the swap zero map), so they are counted apart. Nothing here sets anything
up or tears anything down: callers own their devices.
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from tierswap.errors import TierswapError

PAGE = 4096


class BenchError(TierswapError):
    """A benchmark step failed; the message is one line for the operator."""


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN for none."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def probe_overhead(samples: int = 2000) -> float:
    """Median µs of the same timed preadv on /dev/zero: the probe's own syscall+Python cost."""
    buf = mmap.mmap(-1, PAGE)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        t = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            os.preadv(fd, [buf], 0)
            t.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
        buf.close()
    return round(pct([x / 1000 for x in t], 50), 2)


def probe_latency(targets: list[tuple[str, int]], samples: int, seed: int) -> dict[str, Any]:
    """QD1 4 KiB O_DIRECT random reads over [page 1, used pages] of each target.

    `targets` is (path, used pages); a target is picked with probability proportional to its
    used pages (page 0 is the swap header). The buffer is an anonymous mmap, hence page
    aligned as O_DIRECT requires. Reads that return an all-zero page hit slots never written,
    so they are also counted.
    """
    targets = [(p, u) for p, u in targets if u > 1]
    if not targets:
        return {"samples": 0, "note": "no used pages"}
    rng = random.Random(seed)
    buf = mmap.mmap(-1, PAGE)
    zero = bytes(PAGE)
    fds: list[int] = []
    total = sum(u for _, u in targets)
    lat: list[float] = []
    lat_nz: list[float] = []
    zeros = 0
    try:
        for p, _ in targets:
            fds.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
        for _ in range(samples):
            r = rng.randrange(total)
            k = 0
            while r >= targets[k][1]:
                r -= targets[k][1]
                k += 1
            page = 1 + rng.randrange(targets[k][1] - 1)
            t0 = time.perf_counter_ns()
            n = os.preadv(fds[k], [buf], page * PAGE)
            us = (time.perf_counter_ns() - t0) / 1000
            if n != PAGE:
                raise BenchError(f"short O_DIRECT read from {targets[k][0]}: {n} bytes")
            lat.append(us)
            if buf[:] == zero:
                zeros += 1
            else:
                lat_nz.append(us)
    finally:
        for fd in fds:
            os.close(fd)
        buf.close()
    return {
        "samples": len(lat),
        "targets": [{"path": p, "used_pages": u} for p, u in targets],
        "p50_us": round(pct(lat, 50), 1),
        "p90_us": round(pct(lat, 90), 1),
        "p99_us": round(pct(lat, 99), 1),
        "mean_us": round(statistics.fmean(lat), 1),
        "zero_page_reads": zeros,
        "nonzero_p50_us": round(pct(lat_nz, 50), 1) if lat_nz else None,
        "nonzero_p99_us": round(pct(lat_nz, 99), 1) if lat_nz else None,
    }


MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")


def zram_snapshot(sysdir: Path) -> dict[str, Any]:
    """Compression statistics of a zram device from its mm_stat (`sysdir`: /sys/block/zramN).

    `ratio_orig_compr` is the definition both tools compare (issue 9): original bytes over
    compressed bytes, same-filled (zero) pages included on both sides, as zram counts them in
    orig_data_size.
    """
    f = [int(x) for x in (sysdir / "mm_stat").read_text().split()]
    mm = dict(zip(MM_STAT_FIELDS, f, strict=False))
    orig, compr, used = mm["orig_data_size"], mm["compr_data_size"], mm["mem_used_total"]
    same = mm.get("same_pages", 0)
    return {
        "mm_stat": mm,
        "stored_pages": orig // PAGE,
        "compression_ratio": orig / used if used else None,  # orig / allocator memory
        "ratio_orig_compr": orig / compr if compr else None,
        # zram counts same-filled pages in orig_data_size; without them:
        "ratio_excl_same": (orig - same * PAGE) / used if used else None,
    }


def tierswap_ratio_incl_zero(status: dict[str, Any]) -> float | None:
    """tierswap's side of `ratio_orig_compr`: (stored + zero pages) x 4096 / stored bytes."""
    pages = status["pages"]
    stored = status.get("stored_bytes") or 0
    return (pages["stored"] + pages["zero"]) * PAGE / stored if stored else None


def private_config_text(*, state_dir: Path, run_dir: Path, tier_file: Path, device_size: int,
                        memory_capacity: int, file_capacity: int, shards: int = 1,
                        priority: int = 100, memory_compression: str = "zstd:1") -> str:
    """A tierswap config whose state, run directory and tier file are the benchmark's own.

    A second instance with other directories never touches the operator's (its control
    socket, state file, mount and loop devices are all found through these paths).
    """
    return (
        f'[daemon]\nstate_dir = "{state_dir}"\nrun_dir = "{run_dir}"\n\n'
        f'[device]\nsize = {device_size}\npriority = {priority}\nshards = {shards}\n\n'
        f'[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = {memory_capacity}\n'
        f'compression = "{memory_compression}"\n\n'
        f'[[tier]]\nname = "disk"\nkind = "file"\n'
        f'path = "{tier_file}"\ncapacity = {file_capacity}\n'
        f'compression = "zstd:1"\n'
    )
