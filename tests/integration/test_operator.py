"""An operator's view of a real instance: `status` in swapon's conventions, a shard that does
not answer (SIGSTOPped: the real kernel-level stop, not a fake), the summary a user who is not
root reads, and the metrics textfile and summary going away on stop.

Run under the machine lock (tests share the host's swap):
    flock /tmp/tierswap-swap.lock .venv/bin/python -m pytest -q tests/integration/test_operator.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import cli

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 256 * MiB
SHARDS = 2


def _instance(make_instance, base: Path):
    (base / "metrics").mkdir()
    return make_instance(size="256M", ram="32M", disk="256M", shards=SHARDS,
                         extra=f'[metrics]\ntextfile = "{base}/metrics/tierswap.prom"\n'
                               "interval = 1.0\n")


def _wait(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_status_flags_unresponsive_shard_and_summary(make_instance, base):
    inst = _instance(make_instance, base)
    assert len(inst.devices) == SHARDS
    p = cli("status", "--bytes", "--raw", "--noheadings", "--output", "NAME,SIZE,USED",
            config=inst.config)
    rows = [line.split(" ") for line in p.stdout.splitlines()]
    assert len(rows) == SHARDS and all(len(r) == 3 for r in rows)
    assert [r[0] for r in rows] == inst.devices
    assert all(r[1] == str(SIZE // SHARDS) and r[2].isdigit() for r in rows)

    # the summary next to the run dir, world-readable, and the textfile, while running
    summary_file = base / "run.status.json"
    textfile = base / "metrics" / "tierswap.prom"
    _wait(lambda: summary_file.exists() and textfile.exists())
    assert summary_file.stat().st_mode & 0o777 == 0o644

    # a shard stopped by SIGSTOP: status still comes back and says so, with /proc/swaps' view
    st = json.loads(cli("status", "--json", config=inst.config).stdout)
    victim = st["shards"][1]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        p = cli("status", "--raw", "--noheadings", "--output", "NAME,STATE,PRIO",
                config=inst.config, timeout=30)  # a guard against a hang, not a speed bound
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    rows = [line.split(" ") for line in p.stdout.splitlines()]
    assert rows[0] == [inst.devices[0], "serving", "100"]
    assert rows[1] == [victim["device"], "unresponsive", "100"]  # PRIO from /proc/swaps

    # a user who is not root: the summary, through a config that user may read
    base.chmod(0o755)
    inst.config.chmod(0o644)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PYTHONPATH": ":".join([str(Path(__file__).parents[2]), *site]), "PATH": "/usr/bin"}
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "/usr/bin/python3", "-m", "tierswap", "status", "--bytes", "--raw",
                        "--noheadings", "--output", "NAME,SIZE,USED", "--config",
                        str(inst.config)],
                       capture_output=True, text=True, timeout=60, env=env, cwd="/")
    if "ModuleNotFoundError" in p.stderr or "No such file" in p.stderr:
        pytest.skip(f"no Python for another user here: {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr
    rows = [line.split(" ") for line in p.stdout.splitlines()]
    assert [r[0] for r in rows] == inst.devices and all(len(r) == 3 for r in rows)
    assert "summary written" in p.stderr

    # down: the summary and the metrics textfile go with the daemon
    cli("down", config=inst.config)
    assert not summary_file.exists() and not textfile.exists()
