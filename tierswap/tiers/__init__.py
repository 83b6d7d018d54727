"""Tiers by config kind. A memory tier is an arena the lane serves itself (memory.py); the
other kinds are stores reached through trio. Import a store class only through `tier_class`, so
that optional dependencies (the remote tier's crypto and NBD client) load only when configured."""

from __future__ import annotations

import importlib

from tierswap.tiers.base import Store

_KINDS = {
    "file": ("tierswap.tiers.file", "FileTier"),
    "remote": ("tierswap.tiers.remote", "RemoteTier"),
}


def tier_class(kind: str) -> type[Store]:
    module, name = _KINDS[kind]
    cls: type[Store] = getattr(importlib.import_module(module), name)
    return cls
