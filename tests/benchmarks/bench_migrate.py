"""Migration rate between tiers, measured on the lane itself (no mount, no swap).

`python tests/benchmarks/bench_migrate.py [--size 512M]`: fills a RAM tier with the workload's
mixed pages through the lane (FUSE writes of 512 KiB over a socketpair, tests/lane/harness.py),
then moves every page RAM -> file and file -> RAM with the tiering engine's `migrate`, and
prints MB/s of uncompressed pages moved and of stored (compressed) bytes moved. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.lane.harness import open_lane
from tierswap.commands import Migrate
from tierswap.policy import Policy
from tierswap.workload import expected_pages, parse_size


async def run(size: int) -> dict:
    async with open_lane(size=2 * size, mem=str(2 * size), disk=str(2 * size)) as rig:
        ram = rig.svc.tiers[0]
        while ram.size < ram.capacity and await ram._grow_once():
            pass
        policy = Policy(rig.svc, rig.config.policy)
        req = 128  # pages per request, as the loop device sends them under direct I/O
        for first in range(0, size // 4096, req):
            data = expected_pages(1, np.arange(first, first + req)).tobytes()
            await rig.client.write(first * 4096, data)
        pages = rig.stats().stored_pages

        async def progress(_):
            pass

        out: dict = {"size_bytes": size, "pages": pages}
        for src, dst in (("ram", "disk"), ("disk", "ram")):
            t0 = time.perf_counter()
            res = await policy.handle(Migrate(src=src, dst=dst, all=True), progress)
            dt = time.perf_counter() - t0
            out[f"{src}_to_{dst}"] = {
                "seconds": round(dt, 3),
                "pages": res["pages"],
                "uncompressed_mb_per_s": round(res["pages"] * 4096 / dt / 1e6, 1),
                "stored_mb_per_s": round(res["bytes"] / dt / 1e6, 1),
            }
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="512M")
    args = p.parse_args()
    print(json.dumps(trio.run(run, parse_size(args.size))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
