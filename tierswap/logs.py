"""Logging fit for journald, and never in the way of the I/O path.

Under systemd each line carries a <N> priority prefix (sd-daemon(3)); elsewhere a timestamped
line on stderr. Page contents are never logged.

Why a queue: stderr is journald's stream socket, and journald can stall under memory pressure
(it may even be swapped out to this very device). A write to it from the trio thread would
then stop FUSE. So a record is formatted by the caller, put on a bounded queue without
waiting (`put_nowait`), and written by one writer thread; when the queue is full the record
is dropped and counted. The count is in every shard's status (`log_dropped`), and once the
writer gets through again it logs how many lines were lost.

Limits: at most QUEUE_RECORDS records wait (each a few hundred bytes: a bounded, small
amount of locked memory); a record is lost only while the writer is stuck; at exit the
writer gets FLUSH_TIMEOUT seconds to write what is queued.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import queue
import sys
import threading
from typing import Any

QUEUE_RECORDS = 4096
FLUSH_TIMEOUT = 2.0

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def under_journal() -> bool:
    """True when stderr is the journal stream systemd gave us (systemd.exec(5)): the variable
    alone is inherited by children that write elsewhere, so compare device and inode."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler whose put never blocks and never raises: a full queue drops the record."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self._lock = threading.Lock()  # held for an increment only
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1


class _Writer(threading.Thread):
    """Takes records off the queue and writes them; reports drops once it gets through."""

    def __init__(self, q: queue.Queue[Any], source: DroppingQueueHandler,
                 target: logging.Handler) -> None:
        super().__init__(name="tierswap-log", daemon=True)
        self.q = q
        self.source = source
        self.target = target
        self.reported = 0
        self.stopping = False

    def run(self) -> None:
        while True:
            try:
                rec = self.q.get(timeout=1.0)
            except queue.Empty:
                rec = None
            if rec is _STOP:
                self._report_drops()
                return
            if isinstance(rec, threading.Event):  # a flush() marker
                rec.set()
            elif rec is not None:
                self.target.handle(rec)
            self._report_drops()

    def _report_drops(self) -> None:
        dropped = self.source.dropped
        if dropped > self.reported:
            lost, self.reported = dropped - self.reported, dropped
            rec = logging.LogRecord("tierswap.logs", logging.WARNING, __file__, 0,
                                    "log output stalled: %d log line(s) dropped (%d in all)",
                                    (lost, dropped), None)
            self.target.handle(rec)


_STOP = object()
_state: dict[str, Any] = {}


def dropped() -> int:
    """Log records dropped so far in this process because the log output was stalled."""
    h = _state.get("handler")
    return h.dropped if h is not None else 0


def _stop_writer() -> None:
    writer: _Writer | None = _state.pop("writer", None)
    if writer is None:
        return
    # a stuck writer with a full queue: it is a daemon thread and ends with the process
    with contextlib.suppress(queue.Full):
        writer.q.put_nowait(_STOP)
    writer.join(FLUSH_TIMEOUT)


def setup_logging(level: str | int | None = None) -> None:
    """Root logging through the bounded queue to stderr; calling it again replaces the old."""
    level = level or os.environ.get("TIERSWAP_LOG_LEVEL", "INFO")
    _stop_writer()
    out = logging.StreamHandler(sys.stderr)
    if under_journal():
        out.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        out.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    q: queue.Queue[Any] = queue.Queue(QUEUE_RECORDS)
    handler = DroppingQueueHandler(q)
    writer = _Writer(q, handler, out)
    writer.start()
    _state.update(handler=handler, writer=writer)
    if not _state.get("atexit"):
        atexit.register(_stop_writer)
        _state["atexit"] = True
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def flush(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until the writer has written everything queued so far; False if it is stuck."""
    writer: _Writer | None = _state.get("writer")
    if writer is None:
        return True
    done = threading.Event()
    try:
        writer.q.put(done, timeout=timeout)
    except queue.Full:
        return False
    return done.wait(timeout)


def shutdown_logging() -> None:
    """Stop the writer (after writing what is queued, within FLUSH_TIMEOUT)."""
    _stop_writer()
