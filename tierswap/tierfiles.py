"""Where a file tier lives: its "auto" size, and the checks of a tier on a block device.

Split from tierswap.config (which calls these while it parses a [[tier]]); every problem is a
`ConfigError` naming the key. Nothing here creates or writes anything.

"auto" on a file tier must give the same answer at every start on one machine (issue 11):
an existing tier file of tierswap's is reused at its size while that is within the bound, and
only a new file (or one beyond the bound, resized on purpose) is sized from the free room,
counting the room the file itself takes. A new file is sized conservatively.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from tierswap.blockdev import device_size, in_use
from tierswap.errors import ConfigError


def file_capacity(where: str, path: Path, cap_raw: Any, ram: int,
                   block: bool) -> tuple[int, str]:
    """Capacity of a file tier, and how it was found (said by check-config and at start).

    "auto" on a file must give the same answer at every start on one machine: an existing
    tier file of ours is reused at its size while that is within the bound, because the
    free room it would be computed from is the room the file already takes (issue 11). A
    new file gets a conservative size (AUTO_FILE_MAX at most), never most of the disk."""
    from tierswap import config as C  # deferred: config imports this module

    key = f"{where}.capacity"
    if block:
        from tierswap.tiers.file import HEADER

        try:
            room = device_size(path) - HEADER
        except OSError as e:
            raise ConfigError(f"{where}.path: cannot read the size of {path}: "
                              f"{e.strerror}") from None
        if cap_raw == "auto":
            return room, f"auto: the whole block device {path}"
        capacity = C.parse_size(cap_raw, key)
        if capacity > room:
            raise ConfigError(f"{key}: {C.format_size(capacity)} exceeds the block device {path} "
                              f"({C.format_size(room)} after the 4K tier header)")
        return capacity, ""
    if cap_raw != "auto":
        return C.parse_size(cap_raw, key), ""
    bound = min(ram // 2, C.AUTO_FILE_MAX)
    mark, own = existing_tier_file(path)
    if mark is not None and (4 << 20) <= mark.capacity <= bound:
        return mark.capacity, "auto: the size of the existing tier file"
    capacity = min(bound, (C.fs_free(path.parent) + own) // 4)
    how = "auto: min(RAM / 2, 8G, a quarter of the free room)"
    if mark is not None:
        how += f"; the existing tier file ({C.format_size(mark.capacity)}) is resized"
    return capacity, how


def existing_tier_file(path: Path) -> tuple[Any, int]:
    """(its tier-file header or None, bytes it takes on disk) of a regular file at `path`."""
    from tierswap.tiers.file import read_mark

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, 0
        return read_mark(path), st.st_blocks * 512
    except OSError:
        return None, 0


def check_tier_device(path: Path, where: str, overwrite: bool) -> None:
    """A block device as a file tier: not in use by anything else (mounted, swap, held by
    device mapper or RAID, nor any partition of it), and either with tierswap's tier header
    or with ``overwrite = true``: a partition's content is never replaced unasked."""
    from tierswap.tiers.file import read_mark  # deferred: only file tiers need it

    try:
        why = in_use(path)
        marked = why is None and read_mark(path, follow=True) is not None
    except OSError as e:
        raise ConfigError(f"{where}.path: cannot check {path}: {e.strerror}") from None
    if why is not None:
        raise ConfigError(f"{where}.path: block device {path} is not free: {why}")
    if not marked and not overwrite:
        raise ConfigError(f"{where}.path: block device {path} has no tierswap tier header; "
                          f"refusing to overwrite it (set {where}.overwrite = true to allow "
                          f"that)")
