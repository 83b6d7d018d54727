"""The supervisor's record of one shard (`ShardSlot`) and the states it reports.

Its own module so that supervisor.py (one supervisor's life: bring-up, watching, tear-down) and
handover.py (what passes from one supervisor to the next) share it without importing each
other. It only holds state: what is done to a shard is in those two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from tierswap.kit import Kit
from tierswap.layout import ShardLayout
from tierswap.procs import Pidfd, ProcessId

SERVING, RESTARTING, FAILED, STARTING = "serving", "restarting", "failed", "starting"
STOP_TIMEOUT = 30.0  # a shard asked to stop or to hand its kit over must be gone within this
RETRY_FIRST = 5.0  # a failed shard with its kit is tried again after this, then backing off


@dataclass
class ShardSlot:
    """The supervisor's record of one shard: its process, its device and its state.

    One owner (the supervisor's trio thread) changes it; `info()` is what status reports.
    `lock` serialises what is done to the shard's device (swapoff, detach), so a shard's
    death and a `down` never act on it at once.
    """

    index: int
    paths: ShardLayout
    proc: trio.Process | None = None  # our child; None for a shard adopted from elsewhere
    pidfd: Pidfd | None = None  # watched for the process's exit (child or not)
    ident: ProcessId | None = None  # pid and start time, for state.json
    device: str | None = None  # the loop device while it is attached
    backing: str | None = None  # major:minor of the FUSE file under the loop device
    state: str = STARTING
    restarts: int = 0
    reason: str | None = None  # why it is not serving
    kit: Kit = field(default_factory=Kit)
    exited: trio.Event = field(default_factory=trio.Event)  # its current process is gone
    lock: trio.Lock = field(default_factory=trio.Lock)
    silent_since: float | None = None  # trio time of the first unanswered ping in a row
    handing_off: bool = False  # asked to hand its kit over to a replacement (restart)
    retry_at: float | None = None  # failed with its kit held: trio time of the next attempt
    retry_every: float = RETRY_FIRST

    @property
    def pid(self) -> int | None:
        return self.ident.pid if self.ident is not None else None

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "device": self.device,
                "state": self.state, "restarts": self.restarts, "reason": self.reason}
