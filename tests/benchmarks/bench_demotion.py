"""Cost of background demotion on foreground swap-out, on a real swap device.

`python tests/benchmarks/bench_demotion.py [--size 512M] [--limit 128M]` (root). Runs the
verifying workload twice against tierswap with a small RAM tier in front of a file tier:
once with demotion off (high_watermark = 1.0: the RAM tier fills, then writes spill to the
file tier), once with demotion on (watermarks 0.5/0.3: the policy keeps moving cold runs from
RAM to file while the workload swaps). Prints one JSON line with both runs' phase rates and
the ratios (on / off).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.integration.harness import config_text, start, stop
from tests.integration.test_swap import finish, run_workload
from tierswap.cgroup import MemoryCgroup
from tierswap.workload import parse_size

POLICY = {
    "off": "\n[policy]\nhigh_watermark = 1.0\nlow_watermark = 1.0\n",
    "on": "\n[policy]\nhigh_watermark = 0.5\nlow_watermark = 0.3\nrate = \"256M\"\n",
}


def one(mode: str, size: str, limit: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"tierswap-demote-{mode}-", dir="/var/tmp"))
    cfg = base / "tierswap.toml"
    inst = start(base, config_text(base, size="4G", ram="64M", disk="4G", extra=POLICY[mode]))
    try:
        with MemoryCgroup.create(f"tierswap-bench-demote-{os.getpid()}", limit) as cg:
            res = finish(run_workload(cg, size, 5))
        st = inst.status()
        return {"phases": res["phases"],
                "demotions": st["tiers"][1]["counters"]["demotions"],
                "ram_stored_bytes": st["tiers"][0]["stored_bytes"]}
    finally:
        stop(base, cfg)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="512M")
    p.add_argument("--limit", default="128M")
    args = p.parse_args()
    runs = {m: one(m, args.size, parse_size(args.limit)) for m in ("off", "on")}
    ratio = {ph: round(runs["on"]["phases"][ph]["mb_per_s"] / runs["off"]["phases"][ph]["mb_per_s"],
                       3) for ph in ("fill", "seq", "rand")}
    print(json.dumps({"size": args.size, "limit": args.limit, "runs": runs,
                      "ratio_on_over_off": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
