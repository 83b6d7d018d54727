"""What `tierswap up` is about to do, said before it does anything: the virtual size, the
shards, each tier with its size and where it lives, and what on this machine may work against
it (another swap area at the same priority, a removed config key).

Nothing here allocates, mounts or writes: it reads the config, stats file-tier paths and reads
/proc/swaps (which anyone may read). Limits: the sizes are the configured ones ("auto" already
resolved by config.py); whether a file tier's file is reused or resized is decided later, at
start, and logged there.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from tierswap.config import Config, TierConfig, format_size


def _where(t: TierConfig) -> str:
    if t.kind == "memory":
        return "locked RAM, taken as pages arrive"
    if t.kind == "file":
        assert t.path is not None
        try:
            st = os.stat(t.path)
        except FileNotFoundError:
            return f"{t.path} (new file)"
        except OSError as e:
            return f"{t.path} ({e.strerror})"
        if stat.S_ISBLK(st.st_mode):
            return f"{t.path} (block device)"
        return f"{t.path} (existing file, {format_size(st.st_size)})"
    if t.kind == "remote":
        how = (f"erasure {t.erasure[0]}+{t.erasure[1]}" if t.erasure
               else f"{t.replicas} replica(s)")
        return f"{', '.join(t.targets)} ({how})"
    return "-"


def plan_lines(config: Config) -> list[str]:
    """The plan, one line per item: the device first, then each tier in order."""
    share = config.size // max(1, config.shards)
    lines = [f"plan: {format_size(config.size)} virtual swap ({config.size} bytes) in "
             f"{config.shards} device(s) of {format_size(share)}, priority {config.priority}"
             f" ({config.source})"]
    for t in config.tiers:
        lines.append(f"  tier {t.name} ({t.kind}): {format_size(t.capacity)}, "
                     f"{t.compression}, in {_where(t)}")
    return lines


def same_priority_swaps(config: Config, swaps: Mapping[str, Mapping[str, Any]],
                        ours: Collection[str] = ()) -> list[str]:
    """Warnings for every active swap area (zram, a partition, a swap file) that is not ours
    and has the priority tierswap will use: the kernel spreads pages over the areas of one
    priority in turn, so tierswap would get only part of them, and its tiering would not
    decide where the rest go."""
    out = []
    for name, area in swaps.items():
        if name in ours or area.get("priority") != config.priority:
            continue
        kind = "zram" if Path(name).name.startswith("zram") else str(area.get("type", "swap"))
        out.append(f"warning: {name} ({kind}) is active at priority {config.priority}, as "
                   f"tierswap will be: the kernel would alternate pages between them; give "
                   f"one another priority ([device] priority, or swapon --priority)")
    return out
