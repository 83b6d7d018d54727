"""Migration rate between tiers, measured on the device itself (no FUSE, no swap).

`python tests/benchmarks/bench_migrate.py [--size 512M]`: fills a RAM tier with the workload's
mixed pages through `VirtualSwapDevice.write` in 512 KiB requests, then moves every page
RAM -> file and file -> RAM with the tiering engine's `migrate`, and prints MB/s of
uncompressed pages moved and of stored (compressed) bytes moved. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from tierswap.config import parse_config
from tierswap.device import open_device
from tierswap.policy import Policy
from tierswap.tiers.file import prepare_file
from tierswap.workload import expected_pages, parse_size


class _Shard:
    def __init__(self, config, device):
        self.config, self.device = config, device

    def tier_index(self, name):
        return next(t.index for t in self.device.tiers if t.name == name)


async def run(size: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="tierswap-bench-migrate-", dir="/var/tmp"))
    cfg = parse_config(f"""
[daemon]
state_dir = "{base}/state"
run_dir = "{base}/run"
[device]
size = "{2 * size}"
[[tier]]
name = "ram"
kind = "memory"
capacity = "{2 * size}"
[[tier]]
name = "disk"
kind = "file"
path = "{base}/disk.tier"
capacity = "{2 * size}"
""", check_fs=False)
    prepare_file(cfg.tiers[1].path, cfg.tiers[1].capacity)
    dev = await open_device(cfg, 0)
    ram = dev.tiers[0]
    while ram.space.available < ram.space.nseg and await ram.grow():
        pass
    policy = Policy(_Shard(cfg, dev))
    req = 128  # pages per request, as the loop device sends them under direct I/O
    for first in range(0, size // 4096, req):
        data = expected_pages(1, np.arange(first, first + req)).tobytes()
        await dev.write(first * 4096, data)
    pages = sum(t.pages for t in dev.tiers)

    async def progress(_):
        pass

    out = {"size_bytes": size, "pages": pages}
    for src, dst in (("ram", "disk"), ("disk", "ram")):
        t0 = time.perf_counter()
        res = await policy.handle({"cmd": "migrate", "from": src, "to": dst, "all": True},
                                  progress)
        dt = time.perf_counter() - t0
        out[f"{src}_to_{dst}"] = {
            "seconds": round(dt, 3),
            "pages": res["pages"],
            "uncompressed_mb_per_s": round(res["pages"] * 4096 / dt / 1e6, 1),
            "stored_mb_per_s": round(res["bytes"] / dt / 1e6, 1),
        }
    for t in dev.tiers:
        await t.aclose()
    dev.map.close()
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="512M")
    args = p.parse_args()
    print(json.dumps(trio.run(run, parse_size(args.size))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
