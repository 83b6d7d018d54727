"""A short demonstration under memory pressure: `python -m tierswap.demo [--size 1G]`.

Runs the verifying workload in a memory cgroup a quarter of its size, so most of its pages go
through swap (tierswap, if it is the active swap device), shows the running daemon's status
while the pages are out, then lets the workload read and check every page.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tierswap.cgroup import CgroupError, MemoryCgroup, run_in_cgroup
from tierswap.config import ConfigError, format_size, load_config
from tierswap.control import ControlError, call
from tierswap.layout import Layout
from tierswap.status import render_table
from tierswap.workload import parse_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierswap.demo")
    p.add_argument("--size", default="1G")
    p.add_argument("--config")
    args = p.parse_args(argv)
    try:
        size = parse_size(args.size)
        config = load_config(args.config)
        hold = Path(tempfile.mkdtemp(prefix="tierswap-demo-")) / "hold"
        limit = max(size // 4, 64 << 20) + (48 << 20)  # + the workload's own interpreter
        with MemoryCgroup.create(f"tierswap-demo-{os.getpid()}", limit) as cg:
            print(f"workload: {format_size(size)} in a {format_size(limit)} memory cgroup")
            proc = run_in_cgroup(cg, [sys.executable, "-m", "tierswap.workload", "--size",
                                      args.size, "--hold-file", str(hold)],
                                 stdout=subprocess.PIPE, text=True)
            while not hold.exists() and proc.poll() is None:
                time.sleep(0.2)
            print(f"filled; {format_size(cg.swap_bytes())} of it is swapped out. Daemon status:")
            try:
                print(render_table(call(Layout.of(config).control_socket, {"cmd": "status"})))
            except ControlError as e:
                print(f"(tierswap status unavailable: {e})")
            hold.unlink(missing_ok=True)
            out, _ = proc.communicate()
        res = json.loads(out)
        ph = res["phases"]
        print(f"verified {res['pages']} pages: {res['bad_pages']} bad; "
              f"fill {ph['fill']['mb_per_s']} MB/s, in-order read {ph['seq']['mb_per_s']} MB/s, "
              f"random read {ph['rand']['mb_per_s']} MB/s")
        return 0 if res["ok"] else 1
    except (CgroupError, ConfigError, OSError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
