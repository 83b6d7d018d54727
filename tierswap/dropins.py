"""Drop-in files: ``<config>.d/*.toml`` merged over the configuration, in name order.

The way systemd and zram-generator do it, so a package or an operator can change one key
without copying the whole file (``/etc/tierswap/tierswap.toml.d/50-disk.toml`` with
``[device]`` ``priority = 10``). The rules, also in docs/configuration.md:

* files are read in the byte order of their names (``10-a.toml`` before ``20-b.toml``);
  only names ending in ``.toml`` and not starting with a dot count;
* tables merge key by key, recursively: a later file's key replaces an earlier one's, keys
  it does not name are kept;
* ``[[tier]]`` merges by tier name (``name``, or ``kind`` when the table has no name): a
  drop-in tier with the name of an existing tier changes only the keys it gives; one with a
  new name is added after the others. A drop-in cannot remove a tier or reorder tiers;
* every other array (``targets``) is replaced whole.

`merge` also records which file set each key, so that a validation error names the drop-in
that is at fault rather than the main file. `files` lists a directory's drop-ins and refuses
any that someone other than root could have written.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from pathlib import Path
from typing import Any

from tierswap.errors import ConfigError

_KEY = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def _tier_name(t: Any) -> Any:
    return t.get("name", t.get("kind")) if isinstance(t, dict) else None


def _mark(origins: dict[str, str], path: str, value: Any, origin: str) -> None:
    origins[path] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, f"{path}.{k}", v, origin)


def merge(base: dict[str, Any], over: dict[str, Any], origin: str,
          origins: dict[str, str], prefix: str = "") -> None:
    """Merge document `over` (from file `origin`) into `base`, in place."""
    for k, v in over.items():
        path = f"{prefix}.{k}" if prefix else k
        if not prefix and k == "tier" and isinstance(v, list) and isinstance(base.get(k), list):
            _merge_tiers(base[k], v, origin, origins)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v, origin, origins, path)
        else:
            base[k] = copy.deepcopy(v)
            _mark(origins, path, v, origin)
            if isinstance(v, list):
                for i, item in enumerate(v):
                    _mark(origins, f"{path}[{i}]", item, origin)


def _merge_tiers(tiers: list[Any], over: list[Any], origin: str,
                 origins: dict[str, str]) -> None:
    for t in over:
        name = _tier_name(t)
        found = next((i for i, b in enumerate(tiers)
                      if isinstance(b, dict) and name is not None and _tier_name(b) == name),
                     None)
        if found is not None and isinstance(t, dict):
            merge(tiers[found], t, origin, origins, f"tier[{found}]")
        else:
            tiers.append(copy.deepcopy(t))
            _mark(origins, f"tier[{len(tiers) - 1}]", t, origin)


def origin_of(message: str, origins: dict[str, str]) -> str | None:
    """The file that set the key a validation error names (``tier[1].path: ...``), if known."""
    m = _KEY.match(message)
    if m is None:
        return None
    key = m.group(1)
    while key:
        if key in origins:
            return origins[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def files(d: Path) -> list[Path]:
    """`d`/*.toml in name order; none when `d` does not exist. A drop-in can point a tier at
    any file, so the directory and each file must be root's and not writable by others."""
    try:
        st = os.stat(d)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{d}: cannot read the drop-in directory: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{d}: expected a directory of drop-in files")
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".toml") and not n.startswith("."))
    except OSError as e:
        raise ConfigError(f"{d}: cannot list: {e.strerror}") from None
    out = []
    for p in [d] + [d / n for n in names]:
        try:
            pst = st if p == d else os.stat(p)
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
        if not _trusted(pst):
            raise ConfigError(f"{p}: not owned by root or writable by group or others; "
                              f"tierswap reads no configuration like that")
        if p != d and stat.S_ISREG(pst.st_mode):
            out.append(p)
    return out
