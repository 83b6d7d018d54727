"""tierswap.procs: a pid is signalled only while it is still the process that was recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tierswap.procs import Pidfd, ProcessId, cmdline, is_running, looks_like_ours, start_time


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


def test_start_time_and_cmdline(sleeper):
    st = start_time(sleeper.pid)
    assert isinstance(st, int) and st > 0
    assert start_time(sleeper.pid) == st
    assert start_time(os.getpid()) != st
    assert cmdline(sleeper.pid) == ["sleep", "600"]
    sleeper.kill()
    sleeper.wait()
    assert start_time(sleeper.pid) is None and cmdline(sleeper.pid) is None


def test_start_time_survives_a_parenthesis_in_the_name(tmp_path):
    exe = tmp_path / "a) b (c"
    exe.symlink_to(sys.executable)
    p = subprocess.Popen([str(exe), "-c", "import time; time.sleep(60)"])
    try:
        assert start_time(p.pid) == ProcessId.of(p.pid).start  # type: ignore[union-attr]
        assert start_time(p.pid) > 0  # type: ignore[operator]
    finally:
        p.kill()
        p.wait()


def test_a_reused_pid_is_never_signalled(sleeper):
    real = ProcessId.of(sleeper.pid)
    assert real is not None
    # what a pid file says after the recorded process died and its pid went to `sleeper`
    stale = ProcessId(sleeper.pid, real.start - 1)  # type: ignore[operator]
    assert Pidfd.open(stale) is None
    assert not is_running(stale)
    # with no start time recorded, only our own daemons' command lines are accepted
    assert Pidfd.open(ProcessId(sleeper.pid, None)) is None
    assert sleeper.poll() is None
    with Pidfd.open(real) as p:  # type: ignore[union-attr]
        assert p.alive()
        assert p.send_signal(signal.SIGTERM)
        assert p.wait(10)
        assert not p.alive()
    sleeper.wait()


def test_a_pinned_process_that_exits_is_not_confused_with_its_successor(sleeper):
    ident = ProcessId.of(sleeper.pid)
    p = Pidfd.open(ident)  # type: ignore[arg-type]
    assert p is not None
    sleeper.kill()
    sleeper.wait()  # reaped: the pid is free for reuse
    assert not p.alive()
    assert not p.send_signal(signal.SIGKILL)
    p.close()
    assert Pidfd.open(ident) is None  # type: ignore[arg-type]


def test_pid_file_format_and_records():
    me = ProcessId.of_self()
    assert ProcessId.parse(me.format()) == me
    assert ProcessId.parse("1234\n") == ProcessId(1234, None)  # an older pid file
    for junk in ("", "x", "1", "-5 3", "12 x"):
        assert ProcessId.parse(junk) is None, junk
    assert ProcessId.from_record(me.record()) == me
    for junk in (None, [], {"pid": "1"}, {"pid": True}, {"pid": 1}, {"pid": 50, "start": "x"}):
        assert ProcessId.from_record(junk) is None, junk


@pytest.mark.parametrize(("args", "cfg", "ours"), [
    ([sys.executable, "-m", "tierswap.shard", "--shard", "0", "--config", "/etc/t.toml"],
     "/etc/t.toml", True),
    ([sys.executable, "-m", "tierswap.daemon", "--shard", "0"], None, True),
    (["/usr/local/sbin/tierswap", "up", "--foreground", "--config", "/etc/t.toml"],
     "/etc/t.toml", True),
    (["/usr/local/sbin/tierswap", "up", "--foreground"], "/etc/t.toml", False),  # other config
    (["/usr/local/sbin/tierswap", "down", "--force"], None, False),
    (["sleep", "600"], None, False),
    (["vim", "tierswap.shard", "--shard"], None, False),  # names the module, does not run it
    ([sys.executable, "-m", "tierswap.shard"], None, False),
])
def test_looks_like_ours(args, cfg, ours):
    assert looks_like_ours(args, cfg) is ours
