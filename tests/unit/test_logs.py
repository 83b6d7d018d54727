"""tierswap.logs: journald priority prefixes under systemd, timestamped lines elsewhere.

Under the unit, stderr is a stream to journald, which reads a leading ``<N>`` as the syslog
priority of the line (sd-daemon(3)); so errors show up as errors in ``journalctl -p err``
without a journald client library. JOURNAL_STREAM is set to the "device:inode" of that stream
here, as systemd does, so the tests hold whether or not the module also compares it with
stderr (which systemd.exec(5) recommends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from tierswap import logs


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A real file to stand in for stderr: unlike pytest's capture it has a device and inode."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("TIERSWAP_LOG_LEVEL", raising=False)
    path = tmp_path / "stderr"
    with path.open("w") as f:
        yield f, path


@contextlib.contextmanager
def logging_to(f, monkeypatch, level: str | None = None, *, times: int = 1):
    """`setup_logging` with `f` as stderr, and the root logger as it was afterwards.

    Inside the test itself: pytest swaps its own handlers and capture streams per test phase.
    """
    root = logging.getLogger()
    handlers, old_level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "stderr", f)
    try:
        for _ in range(times):
            logs.setup_logging(level)
        yield
    finally:
        logs.shutdown_logging()
        root.handlers[:] = handlers
        root.setLevel(old_level)


def _emit(f, path: Path) -> list[str]:
    log = logging.getLogger("tierswap.test")
    log.debug("debug line")
    log.info("info line")
    log.warning("warning line")
    log.error("error line")
    log.critical("critical line")
    assert logs.flush()
    f.flush()
    return path.read_text().splitlines()


def test_journald_prefixes_when_journal_stream_is_set(stderr_file, monkeypatch):
    f, path = stderr_file
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with logging_to(f, monkeypatch, "DEBUG"):
        lines = _emit(f, path)
    assert lines == [
        "<7>tierswap.test: debug line",
        "<6>tierswap.test: info line",
        "<4>tierswap.test: warning line",
        "<3>tierswap.test: error line",
        "<2>tierswap.test: critical line",
    ]


def test_plain_lines_otherwise(stderr_file, monkeypatch):
    f, path = stderr_file
    with logging_to(f, monkeypatch):
        lines = _emit(f, path)
    assert len(lines) == 4  # INFO is the default level: no debug line
    pid = os.getpid()
    for line, level in zip(lines, ("INFO", "WARNING", "ERROR", "CRITICAL"), strict=True):
        assert re.fullmatch(
            rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} {level} tierswap\.test\[{pid}\]: "
            rf"{level.lower()} line", line), line


def test_level_from_the_environment(stderr_file, monkeypatch):
    f, path = stderr_file
    monkeypatch.setenv("TIERSWAP_LOG_LEVEL", "ERROR")
    with logging_to(f, monkeypatch):
        lines = _emit(f, path)
    assert [ln.split(" ", 3)[2] for ln in lines] == ["ERROR", "CRITICAL"]


def test_setup_replaces_handlers_instead_of_adding(stderr_file, monkeypatch):
    """Called again (a second setup in one process), it must not print every line twice."""
    f, path = stderr_file
    with logging_to(f, monkeypatch, times=2):
        assert len(_emit(f, path)) == 4


def test_empty_journal_stream_means_no_journal(stderr_file, monkeypatch):
    f, path = stderr_file
    monkeypatch.setenv("JOURNAL_STREAM", "")
    with logging_to(f, monkeypatch):
        lines = _emit(f, path)
    assert lines and not any(ln.startswith("<") for ln in lines)


def test_a_stalled_stderr_never_blocks_the_caller(monkeypatch):
    """stderr is a pipe nobody reads (journald stalled): logging must return at once, drop and
    count, and say how much it dropped once the output moves again."""
    import threading
    import time

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    r, w = os.pipe()
    wf = open(w, "w", buffering=1)  # noqa: SIM115 - closed below
    log = logging.getLogger("tierswap.test.stall")
    worst = [0.0]

    def spam() -> None:
        for i in range(20_000):  # ~5 MB: far more than the pipe (64 KiB) and the queue hold
            t = time.monotonic()
            log.warning("line %d %s", i, "x" * 200)
            worst[0] = max(worst[0], time.monotonic() - t)

    got: list[bytes] = []
    reported = threading.Event()

    def drain() -> None:  # until EOF: the writer must never be left blocked on the pipe
        while chunk := os.read(r, 1 << 16):
            got.append(chunk)
            if b"dropped" in b"".join(got[-2:]):
                reported.set()

    with logging_to(wf, monkeypatch):
        before = logs.dropped()
        caller = threading.Thread(target=spam, daemon=True)
        caller.start()
        caller.join(30)
        blocked = caller.is_alive()
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()  # unblock the writer in every case, so the test cannot hang
        assert not blocked, "a log call blocked on the stalled stderr"
        assert worst[0] < 0.5, f"a log call took {worst[0]:.3f}s"
        lost = logs.dropped() - before
        assert lost > 10_000
        assert reported.wait(30), b"".join(got)[-300:]
        text = b"".join(got).decode()
        assert re.search(r"log output stalled: \d+ log line\(s\) dropped", text)
    wf.close()
    reader.join(10)
    os.close(r)


def test_drop_count_is_in_the_status_record(monkeypatch):
    """Each shard reports `log_dropped` in its stats; status adds them and the supervisor's."""
    from tests.unit.test_metrics import CONFIG, shard_report
    from tierswap import system
    from tierswap.commands import ShardReply
    from tierswap.config import parse_config
    from tierswap.status import combine_status

    monkeypatch.setattr(system, "active_swaps", lambda: {})
    monkeypatch.setattr(logs, "dropped", lambda: 1)
    shards = [ShardReply(0, shard_report(0) | {"log_dropped": 3}),
              ShardReply(1, shard_report(1) | {"log_dropped": 5})]
    st = combine_status(parse_config(CONFIG, check_fs=False), [], shards, active=True)
    assert st["log_dropped"] == 9
