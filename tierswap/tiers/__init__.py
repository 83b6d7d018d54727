"""Tiers by config kind. Import a tier class only through `tier_class` so that optional
dependencies (the remote tier's crypto and NBD client) load only when configured."""

from __future__ import annotations

import importlib

from tierswap.tiers.base import Tier

_KINDS = {
    "memory": ("tierswap.tiers.memory", "MemoryTier"),
    "file": ("tierswap.tiers.file", "FileTier"),
    "remote": ("tierswap.tiers.remote", "RemoteTier"),
}


def tier_class(kind: str) -> type[Tier]:
    module, name = _KINDS[kind]
    return getattr(importlib.import_module(module), name)
