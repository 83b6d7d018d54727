"""The hard case: the daemon inside the same memory cgroup as the workload it swaps for.

A naive user-space swap daemon hangs here within seconds: its own pages are reclaimed into its
own device and it blocks submitting that I/O. tierswap's pages are locked, its RAM arena is
reserved ahead of need and grows only with the cgroup's headroom, so it neither hangs nor is
killed, and the workload finishes with every page verified.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.integration.harness import TIERSWAP, config_text, reap, stop
from tests.integration.test_swap import finish, run_workload
from tierswap import system
from tierswap.cgroup import MemoryCgroup, run_in_cgroup

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_daemon_in_the_workloads_cgroup_neither_hangs_nor_dies(base):
    cfg = base / "t.toml"
    # RAM tier "auto"-like and large: only the cgroup's headroom may stop it growing
    cfg.write_text(config_text(base, size="4G", ram="1G", disk="4G"))
    proc = None
    with MemoryCgroup.create(f"tierswap-hard-{os.getpid()}", 640 * MiB) as cg:
        try:
            up = run_in_cgroup(cg, [*TIERSWAP, "up", "--config", str(cfg)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, err = up.communicate(timeout=120)
            assert up.returncode == 0, err
            state = (base / "run" / "state.json").read_text()
            import json

            pids = [sh["pid"] for sh in json.loads(state)["shards"]] + [json.loads(state)["pid"]]
            # started inside the workload's group, the daemon moved itself out of the limit
            assert not any(p in cg.pids() for p in pids)
            log = (base / "run" / "tierswap.log").read_text()
            assert "left memory-limited cgroup" in log
            t0 = time.monotonic()
            proc = run_workload(cg, "1G", 13)
            res = finish(proc, timeout=900)  # every page verified, exit 0
            assert all(system.pid_alive(p) for p in pids), "a daemon process died"
            assert cg.oom_kills() == 0
            assert res["phases"]["fill"]["seconds"] < 600
            print(f"hard case passed in {time.monotonic() - t0:.0f}s: {res['phases']}")
        finally:
            if proc is not None:
                reap(proc)  # gone before swapoff, which would pull its pages into the group
            stop(base, cfg)
