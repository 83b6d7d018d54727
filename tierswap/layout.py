"""Where an instance keeps its files: one object, so no path is built by hand anywhere else.

Everything under `run_dir` is per boot and private (0700 directories, 0600 files), except
the status summary next to it (`summary_file`, world-readable counts); `state_dir`
is persistent: the session file (which boot the devices were brought up on) and the default
place of file tiers. The slot map is not there: it lives in the shard's kit (memory). Nothing
here creates or touches a file: the layout is names only, cheap to build from a `Config` in
every process (CLI, supervisor, shard, clean-up) so that they all agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWAP_FILE_NAME = "swap.img"  # the one file on each shard's FUSE mount (fs.py serves it)


@dataclass(frozen=True)
class ShardLayout:
    """The paths of shard `index`."""

    index: int
    run_dir: Path  # <run_dir>/shardK: mount point and control socket
    state_dir: Path  # <state_dir>/shardK: the device's own files

    @property
    def mountpoint(self) -> Path:
        return self.run_dir / "mnt"

    @property
    def swap_file(self) -> Path:
        """The FUSE file the loop device is attached to."""
        return self.mountpoint / SWAP_FILE_NAME

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"


@dataclass(frozen=True)
class Layout:
    """The paths of one instance (one configuration)."""

    run_dir: Path
    state_dir: Path
    shards: int

    @classmethod
    def of(cls, config: Any) -> Layout:
        """From a `Config` (typed loosely: config.py does not import this module)."""
        return cls(config.run_dir, config.state_dir, config.shards)

    @property
    def control_socket(self) -> Path:
        """The supervisor's public control socket."""
        return self.run_dir / "control.sock"

    @property
    def pid_file(self) -> Path:
        """The supervisor's pid and start time (see `tierswap.procs`)."""
        return self.run_dir / "tierswap.pid"

    @property
    def state_file(self) -> Path:
        """The supervisor's record of every shard, rewritten at each step of bring-up."""
        return self.run_dir / "state.json"

    @property
    def session_file(self) -> Path:
        """Which boot the devices were last brought up on: written once swap is on, removed by
        a clean tear-down. The one file of a run on persistent storage (no secrets in it), so
        that the next `up` can tell that the host went down with swap on."""
        return self.state_dir / "session.json"

    @property
    def summary_file(self) -> Path:
        """The world-readable status summary (tierswap/summary.py): next to run_dir, not in
        it, because run_dir is 0700."""
        return self.run_dir.with_name(self.run_dir.name + ".status.json")

    @property
    def log_file(self) -> Path:
        """Where a detached `tierswap up` logs."""
        return self.run_dir / "tierswap.log"

    def shard(self, index: int) -> ShardLayout:
        return ShardLayout(index, self.run_dir / f"shard{index}",
                           self.state_dir / f"shard{index}")

    def all_shards(self) -> list[ShardLayout]:
        return [self.shard(k) for k in range(self.shards)]

    def shard_of_file(self, path: str | Path) -> int | None:
        """Which shard's swap file `path` is (a loop device's backing file), if any."""
        p = Path(path)
        for sh in self.all_shards():
            if p == sh.swap_file:
                return sh.index
        return None
