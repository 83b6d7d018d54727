"""Background tasks that a fault never turns into the end of serving, and the signals that
stop a daemon process.

A shard serves FUSE and runs background tasks (policy passes, its control server, RAM-tier
growth, remote repair) in one trio nursery. In a plain nursery an exception in any task
cancels every other, FUSE included, and a shard that stops serving under its swap device loses
every page on it. `keep_running` runs a task so that an exception (say a store's
OSError, or a bug) is logged with its traceback, counted, and the task started again
after a backoff that doubles up to a cap and resets once the task has run for a while.
Cancellation (a shutdown) passes through untouched.

Only the first start is different: a task that fails before it reports started fails the
caller's `nursery.start`, because then nothing is serving yet and start-up should stop with
that error.

Signals: every daemon process (supervisor and shards) handles STOP_SIGNALS for its whole
life, through its swapoff until it exits; a signal while it is already stopping is logged and
ignored, one after a failed swapoff retries it. WATCHDOG_SIGNAL is the unit's
`WatchdogSignal=` (systemd sends it to every process of the unit when the supervisor stops
pinging): handled as a stop, and logged as the watchdog's, never the default abort and core.

Limits: a task that keeps failing keeps being retried at the cap (the counters and the log
show it); none is given up for good, because each is needed for the device to work well
(none is needed for pages to be served).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from tierswap.control import first_error

log = logging.getLogger("tierswap.tasks")

Startable = Callable[..., Awaitable[Any]]  # async fn(*, task_status)

WATCHDOG_SIGNAL = signal.SIGUSR2  # = WatchdogSignal= in systemd/tierswap.service
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, WATCHDOG_SIGNAL)


def signal_name(signum: int) -> str:
    return "the unit's watchdog signal" if signum == WATCHDOG_SIGNAL else signal.Signals(
        signum).name


@dataclass
class TaskHealth:
    """What status shows of one background task."""

    failures: int = 0
    last_error: str | None = None
    running: bool = False


class TaskBoard:
    """The health of a process's background tasks, by name (one owner: the trio thread)."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskHealth] = {}

    def get(self, name: str) -> TaskHealth:
        return self.tasks.setdefault(name, TaskHealth())

    def record(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(h) for name, h in sorted(self.tasks.items())}


def started_at_once(fn: Callable[..., Awaitable[Any]], *args: Any) -> Startable:
    """Adapt `fn(*args)`, which takes no task_status, for `keep_running`."""

    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await fn(*args)

    return run


def _one_line(e: BaseException) -> str:
    leaf = first_error(e)
    text = str(leaf).splitlines()[0] if str(leaf) else ""
    return f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__


async def keep_running(board: TaskBoard, name: str, fn: Startable, *,
                       backoff: tuple[float, float] = (1.0, 60.0),
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run `fn(task_status=...)` until cancelled, restarting it after any exception."""
    health = board.get(name)
    first, delay = True, backoff[0]
    while True:
        t0 = trio.current_time()
        try:
            async with trio.open_nursery() as n:
                await n.start(fn)
                health.running = True
                if first:
                    first = False
                    task_status.started()
            why = "returned"
        except* Exception as eg:
            if first:
                raise  # nothing is serving yet: start-up fails with this
            health.failures += 1
            health.last_error = why = _one_line(eg)
            log.error("%s failed (%d times so far); restarting it in %.1fs", name,
                      health.failures, delay, exc_info=first_error(eg))
        health.running = False
        if why == "returned":
            log.warning("%s returned; restarting it in %.1fs", name, delay)
        if trio.current_time() - t0 > 60 * backoff[0]:
            delay = backoff[0]  # it had been running fine: this is a new fault
        await trio.sleep(delay)
        delay = min(delay * 2, backoff[1])
