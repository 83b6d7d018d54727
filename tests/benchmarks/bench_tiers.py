"""Tier throughput and 4 KiB read latency through the tier interface, side by side.

`python -m tests.benchmarks.bench_tiers [--only remote]` (root not needed; nbdkit and, for the
memory on the targets, nbdinfo must be installed). For the file tier (plain and
`encrypt = true`) on /var/tmp and the remote tier against local nbdkit memory servers (1 and
2 replicas over 2 targets, erasure 4+2 over 6): write 256 MiB as pieces of 128 KiB and 1 MiB
with 1 and 8 writers (erasure: including the parity flush), then time 3000 random 4 KiB
reads one at a time; for erasure also with one target down (all reads, and only those whose
data fragment was on the lost target: decoded from the other K). Each remote
configuration gets fresh servers, and reports what they hold afterwards (`target_mib`: bytes
allocated on all targets, by NBD block status) against the 256 MiB written. One JSON line
per configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from tests.netutil import free_port, spawn_nbdkit, wait_listening
from tierswap.config import parse_config
from tierswap.tiers import tier_class
from tierswap.tiers.file import prepare_file

MiB = 1 << 20
CAP = 512 * MiB
TOTAL = 256 * MiB


def config(base: Path, tier: str):
    return parse_config(f"""
[daemon]
state_dir = "{base}/state"
run_dir = "{base}/run"
[device]
size = "1G"
{tier}
""", check_fs=False)


def allocated(url: str) -> int:
    out = subprocess.run(["nbdinfo", "--map", url], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(f[1]) for f in (line.split() for line in out.splitlines())
               if len(f) >= 3 and int(f[2]) & 1 == 0)


async def read_latency(tier, bases: list[int], piece: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    lat = []
    for _ in range(3000):
        b = bases[rng.integers(len(bases))] + int(rng.integers(piece // 4096)) * 4096
        t = time.perf_counter()
        await tier.read(b, 4096)
        lat.append(time.perf_counter() - t)
    lat.sort()
    return round(lat[1500] * 1e6, 1), round(lat[2970] * 1e6, 1)


async def measure(cfg, piece: int, writers: int, servers=None) -> dict:
    tcfg = cfg.tiers[0]
    tier = await tier_class(tcfg.kind).create(tcfg, 0, cfg, 0)
    out: dict = {}
    async with trio.open_nursery() as nursery:
        if hasattr(tier, "run_background"):
            await nursery.start(tier.run_background)
        data = os.urandom(piece)
        lens = np.full(piece // 4096, 4096, np.uint16)
        bases = [tier.space.allocate(lens)[0].base for _ in range(TOTAL // piece)]
        todo = iter(bases)

        async def writer() -> None:
            for b in todo:
                await tier.write(b, data)

        store = getattr(tier, "store", None)
        t0 = time.perf_counter()
        async with trio.open_nursery() as w:
            for _ in range(writers):
                w.start_soon(writer)
        if store is not None:  # parity is part of the write; reads then go to the targets
            await store.flush(unstage=True)
        out["write_mb_per_s"] = round(TOTAL / (time.perf_counter() - t0) / 1e6, 1)
        out["read_4k_p50_us"], out["read_4k_p99_us"] = await read_latency(tier, bases, piece)
        if servers:
            out["target_mib"] = round(sum(allocated(u) for _, u in servers) / MiB, 1)
            out["target_x"] = round(sum(allocated(u) for _, u in servers) / TOTAL, 3)
        if store is not None and servers:
            servers[0][0].kill()
            while tier.targets[0].up:
                await trio.sleep(0.05)
            out["read_4k_1down_p50_us"], out["read_4k_1down_p99_us"] = \
                await read_latency(tier, bases, piece)
            f = store.g.frag_size  # reads whose data fragment was on the lost target: decoded
            lost = [b + x for b in bases for x in range(0, piece, f)
                    if store.placement.target[(b + x) >> 20, ((b + x) % MiB) // f] == 0]
            if lost:
                out["read_4k_decoded_p50_us"], out["read_4k_decoded_p99_us"] = \
                    await read_latency(tier, lost, min(piece, f))
        nursery.cancel_scope.cancel()
    await tier.aclose()
    return out


def spawn(base: Path, n: int, size: int) -> list:
    servers = []
    for _ in range(n):
        port = free_port()
        p = spawn_nbdkit(port, ("memory", str(size)), base / f"nbdkit-{port}.log")
        assert wait_listening(p, port, 10)
        servers.append((p, f"nbd://127.0.0.1:{port}/"))
    return servers


def remote(servers, key: str) -> str:
    urls = ", ".join(f'"{u}"' for _, u in servers)
    return (f'[[tier]]\nname = "net"\nkind = "remote"\ncapacity = "{CAP}"\n'
            f'compression = "none"\ntargets = [{urls}]\n{key}\n')


async def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    base = Path(tempfile.mkdtemp(prefix="tierswap-bench-tiers-", dir="/var/tmp"))
    files = {
        "file": f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{base}/f.tier"\n'
                f'capacity = "{CAP}"\n',
        "file, encrypted": f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{base}/f.tier"\n'
                           f'capacity = "{CAP}"\nencrypt = true\n',
    }
    remotes = {  # name: (targets, export size, key)
        "remote, 1 replica": (2, CAP, "replicas = 1"),
        "remote, 2 replicas": (2, CAP, "replicas = 2"),
        "remote, erasure 4+2": (6, CAP // 4, 'erasure = "4+2"'),
    }
    live: list = []
    try:
        for piece in (128 << 10, MiB):
            for writers in (1, 8):
                for name, text in files.items():
                    if only not in (None, "file"):
                        continue
                    cfg = config(base, text)
                    prepare_file(cfg.tiers[0].path, CAP)
                    res = await measure(cfg, piece, writers)
                    print(json.dumps({"tier": name, "piece_kib": piece >> 10,
                                      "writers": writers, **res}), flush=True)
                for name, (n, size, key) in remotes.items():
                    if only not in (None, "remote"):
                        continue
                    live = spawn(base, n, size)
                    res = await measure(config(base, remote(live, key)), piece, writers, live)
                    for p, _ in live:
                        p.kill()
                        p.wait()
                    print(json.dumps({"tier": name, "piece_kib": piece >> 10,
                                      "writers": writers, **res}), flush=True)
    finally:
        for p, _ in live:
            p.kill()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
