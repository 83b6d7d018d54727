"""Every error tierswap raises on purpose, under one base class.

`TierswapError` is what the CLI, the control server and a shard's start-up catch to print one
line instead of a traceback: anything else that escapes is a bug and is logged with its
traceback. Its text is one line for the operator.

Two families:
* operator-facing errors (`ConfigError`, `ControlError`, `StartError`, `CommandError`): a
  command, a configuration or a system tool failed; the text says which and why.
* `StorageError` (`DeviceError`, `TierError`): a request on the swap file cannot be served.
  It carries the POSIX meaning of the failure (`errno`: ENOSPC for "no room", EINVAL for a
  request outside the device, EIO for everything else, or the errno a tier's own file or
  socket reported). The lane (tierswap/lane.py) is the one place that turns it into an
  answer to the kernel: the errno of the job it fails.

Limits: errors of helper modules that never cross a module boundary (the NBD client's,
`crypto.AuthenticationError`, `cgroup.CgroupError`, the test workload's) stay local; they are
translated where they leave their module.
"""

from __future__ import annotations

import errno as _errno


class TierswapError(Exception):
    """Base of tierswap's own errors; str() is one line for the operator."""


class ConfigError(TierswapError):
    """A configuration problem, worded for a one-line message that names the key."""


class ControlError(TierswapError):
    """An error reply or a transport failure on a control socket, worded for one line."""


class StartError(TierswapError):
    """Bringing tierswap up failed; one line for the operator."""


class CommandError(TierswapError):
    """A system command (losetup, mkswap, swapon, swapoff, ...) failed; one line."""


class StorageError(TierswapError):
    """A read, write or discard cannot be served. `errno` is what the kernel is told (lane.py)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno or _errno.EIO
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


class DeviceError(StorageError):
    """The device (map, placement, codec) failed a request."""


class TierError(StorageError):
    """An I/O failure inside a tier; the device answers the request with this errno."""
