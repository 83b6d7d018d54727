"""Crash clean-up (`down --force`): identity before any signal, and decisions per shard.

The processes are real: an unrelated `sleep` whose pid is planted in the state and pid files
(what pid reuse looks like), and stand-in shards that serve the real control protocol on the
real socket paths, one answering, one wedged (SIGSTOP). No loop device or mount is involved
(the configuration's run_dir is under tmp_path), so this needs no swap.
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

from tierswap import cleanup
from tierswap.config import parse_config
from tierswap.layout import Layout
from tierswap.procs import ProcessId

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, shards: int = 2) -> Path:
    path = tmp_path / "tierswap.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                    f'[device]\nsize = "16M"\nshards = {shards}\n'
                    '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "4M"\n')
    return path


def tierswap(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSWAP_")}
    return subprocess.run([sys.executable, "-m", "tierswap", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("recorded", ["other_start", "no_start"])
def test_down_force_spares_an_unrelated_process_with_a_planted_pid(tmp_path, sleeper,
                                                                   recorded):
    cfg = write_config(tmp_path)
    lay = Layout.of(parse_config(cfg.read_text(), source=str(cfg), check_fs=False))
    lay.run_dir.mkdir(mode=0o700)
    real = ProcessId.of(sleeper.pid)
    assert real is not None and real.start is not None
    # the recorded processes died; their pids now belong to `sleeper`
    start = real.start - 7 if recorded == "other_start" else None
    rec = {"pid": sleeper.pid, "start": start}
    lay.state_file.write_text(json.dumps({
        **rec, "config": str(cfg), "active": True,
        "shards": [{"shard": 0, **rec, "loop": None, "backing": None},
                   {"shard": 1, **rec, "loop": None, "backing": None}]}))
    lay.pid_file.write_text(f"{sleeper.pid} {start}\n" if start else f"{sleeper.pid}\n")
    p = tierswap("down", "--force", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    time.sleep(0.2)
    assert sleeper.poll() is None, "down --force killed an unrelated process"
    assert "killed" not in p.stdout
    assert not lay.state_file.exists() and not lay.pid_file.exists()
    # and `up` would not think it is running either
    config = parse_config(cfg.read_text(), source=str(cfg), check_fs=False)
    lay.pid_file.write_text(f"{sleeper.pid} {real.start - 7}\n")
    assert cleanup.running_supervisor(config) is None


def stand_in(sock: Path) -> subprocess.Popen:
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, str(REPO / "tests" / "unit" / "stand_in_shard.py"),
                          str(sock)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return p


def test_one_wedged_shard_is_killed_and_the_answering_one_stopped_gracefully(tmp_path):
    cfg_path = write_config(tmp_path)
    config = parse_config(cfg_path.read_text(), source=str(cfg_path), check_fs=False)
    lay = Layout.of(config)
    lay.run_dir.mkdir(mode=0o700)
    good = stand_in(lay.shard(0).control_socket)
    wedged = stand_in(lay.shard(1).control_socket)
    try:
        os.kill(wedged.pid, signal.SIGSTOP)
        lay.state_file.write_text(json.dumps({
            "pid": 999_999_999, "start": 1, "config": str(cfg_path), "active": True,
            "shards": [{"shard": k, **ProcessId.of(p.pid).record()}  # type: ignore[union-attr]
                       for k, p in ((0, good), (1, wedged))]}))
        left = cleanup.stale_state(config)
        assert f"process {good.pid}" in left and f"process {wedged.pid}" in left
        done = cleanup.force_cleanup(config)
        assert good.wait(10) == 0  # told to stop over its socket, exited by itself
        assert wedged.wait(10) == -signal.SIGKILL
        assert f"killed shard 1 process {wedged.pid}" in done
        assert not any("shard 0" in d and "killed" in d for d in done), done
        assert cleanup.stale_state(config) == []
    finally:
        for p in (good, wedged):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_down_force_removes_the_summary_and_textfile_a_crash_left(tmp_path):
    """A supervisor that died left its status summary and metrics textfile: they describe a
    tierswap that no longer runs, so `down --force` removes them with its other files."""
    conf = write_config(tmp_path)
    conf.write_text(conf.read_text() + f'[metrics]\ntextfile = "{tmp_path}/tierswap.prom"\n')
    cfg = parse_config(conf.read_text(), source=str(conf), check_fs=False)
    lay = Layout.of(cfg)
    lay.run_dir.mkdir(mode=0o700)
    lay.summary_file.write_text("{}")
    (tmp_path / "tierswap.prom").write_text("tierswap_active 1\n")
    p = tierswap("down", "--force", "--config", str(conf))
    assert p.returncode == 0, p.stderr
    assert not lay.summary_file.exists() and not (tmp_path / "tierswap.prom").exists()
