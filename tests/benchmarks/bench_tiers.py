"""Tier throughput and 4 KiB read latency through the tier interface, side by side.

`python -m tests.benchmarks.bench_tiers` (root not needed; nbdkit must be installed). For the
file tier (plain and `encrypt = true`) on /var/tmp and the remote tier against local nbdkit
memory servers (1 and 2 replicas): write 256 MiB as pieces of 128 KiB and 1 MiB with 1 and 8
writers, then time 3000 random 4 KiB reads one at a time. One JSON line per configuration.
"""

from __future__ import annotations

import json
import os
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


async def measure(cfg, piece: int, writers: int) -> dict:
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

        t0 = time.perf_counter()
        async with trio.open_nursery() as w:
            for _ in range(writers):
                w.start_soon(writer)
        out["write_mb_per_s"] = round(TOTAL / (time.perf_counter() - t0) / 1e6, 1)
        rng = np.random.default_rng(1)
        lat = []
        for _ in range(3000):
            b = bases[rng.integers(len(bases))] + int(rng.integers(piece // 4096)) * 4096
            t = time.perf_counter()
            await tier.read(b, 4096)
            lat.append(time.perf_counter() - t)
        lat.sort()
        out["read_4k_p50_us"] = round(lat[1500] * 1e6, 1)
        out["read_4k_p99_us"] = round(lat[2970] * 1e6, 1)
        nursery.cancel_scope.cancel()
    await tier.aclose()
    return out


async def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="tierswap-bench-tiers-", dir="/var/tmp"))
    servers = []
    for _ in range(2):
        port = free_port()
        p = spawn_nbdkit(port, ("memory", str(CAP)), base / f"nbdkit-{port}.log")
        assert wait_listening(p, port, 10)
        servers.append((p, f"nbd://127.0.0.1:{port}/"))
    urls = ", ".join(f'"{u}"' for _, u in servers)
    setups = {
        "file": f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{base}/f.tier"\n'
                f'capacity = "{CAP}"\n',
        "file, encrypted": f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{base}/f.tier"\n'
                           f'capacity = "{CAP}"\nencrypt = true\n',
        "remote, 1 replica": f'[[tier]]\nname = "net"\nkind = "remote"\ncapacity = "{CAP}"\n'
                             f'targets = [{urls}]\nreplicas = 1\n',
        "remote, 2 replicas": f'[[tier]]\nname = "net"\nkind = "remote"\ncapacity = "{CAP}"\n'
                              f'targets = [{urls}]\nreplicas = 2\n',
    }
    try:
        for name, text in setups.items():
            cfg = config(base, text)
            if cfg.tiers[0].kind == "file":
                prepare_file(cfg.tiers[0].path, CAP)
            for piece in (128 << 10, MiB):
                for writers in (1, 8):
                    res = await measure(cfg, piece, writers)
                    print(json.dumps({"tier": name, "piece_kib": piece >> 10,
                                      "writers": writers, **res}), flush=True)
    finally:
        for p, _ in servers:
            p.kill()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
