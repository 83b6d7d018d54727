"""The control plane's vocabulary: every command as a pure request type, how it is split across
shards, how the shards' answers are combined, and how the result is rendered for people.

One request crosses the system like this, and nothing else knows a command's shape:

    cli:        Migrate(...).to_wire() ──► supervisor socket
    supervisor: parse(wire, PUBLIC) ──► req.split(n) ──► fan-out, one ShardReply per shard
    shard:      parse(wire, SHARD) ──► the shard (ping, stats, shutdown) or its Policy
    supervisor: req.combine(replies) ──► cli: req.render(result), failures(result)

The wire form is a JSON object ``{"cmd": NAME, ...arguments}`` (control.py carries it).
`parse` checks every argument's type and rejects unknown ones with a one-line `ControlError`,
so the code that acts on a request never sees a malformed one.

Partial answers: the fan-out asks each serving shard with its own timeout and records a
`ShardReply` for each, answered or not. `combine` adds up what answered and lists the rest
under ``"errors"`` (``[{"shard": K, "error": "..."}]``); only when no shard answered at all does
it raise. So one unresponsive or failed shard costs its own part of an answer, never the
whole answer.

Limits: types here are pure (no I/O, no trio). A shard's `Kit` reply carries fds (SCM_RIGHTS);
control.py sends it with sendmsg and `kit.fetch_kit` receives it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tierswap.config import PAGE_SIZE, format_size
from tierswap.errors import ControlError

HOUR = 3600.0


@dataclass(frozen=True)
class ShardReply:
    """One shard's answer in a fan-out: a result, or why there is none."""

    index: int
    result: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------- argument checks


def _str(d: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ControlError(f"{d['cmd']}: {key!r} must be a non-empty string")
    return v


def _count(d: Mapping[str, Any], key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ControlError(f"{d['cmd']}: {key!r} must be a positive integer")
    return v


def _seconds(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ControlError(f"{d['cmd']}: {key!r} must be a number of seconds >= 0")
    return float(v)


def _flag(d: Mapping[str, Any], key: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ControlError(f"{d['cmd']}: {key!r} must be true or false")
    return v


# ---------------------------------------------------------------------------- combining helpers


def _errors(replies: Sequence[ShardReply]) -> list[dict[str, Any]]:
    return [{"shard": r.index, "error": r.error} for r in replies if not r.ok]


def _answered(replies: Sequence[ShardReply]) -> list[ShardReply]:
    """The replies with a result; raises the first error when there is none at all."""
    ok = [r for r in replies if r.ok]
    if not ok:
        first = next((r for r in replies if not r.ok), None)
        raise ControlError(first.error if first is not None and first.error else "no shard")
    return ok


def _with_errors(result: dict[str, Any], replies: Sequence[ShardReply]) -> dict[str, Any]:
    errs = _errors(replies)
    if errs:
        result["errors"] = errs
    return result


def failures(result: Any) -> list[str]:
    """The per-shard failures recorded in a combined result, one line each."""
    if not isinstance(result, dict):
        return []
    return [f"shard {e['shard']}: {e['error']}" for e in result.get("errors", [])]


def _summed(replies: Sequence[ShardReply]) -> dict[str, Any]:
    """The counts of every shard that answered, added up, and the errors of those that did not
    (a shard whose share was skipped answers nothing)."""
    return _with_errors(_sum_fields([r.result for r in _answered(replies) if r.result]), replies)


def _sum_fields(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = sorted({k for r in results for k in r})
    return {k: sum(r.get(k, 0) for r in results) for k in keys}


# ---------------------------------------------------------------------------- request base

STATUS_SHARD_TIMEOUT = 2.0  # seconds a shard has to answer a status round (Stats)


@dataclass(frozen=True)
class Request:
    """A command. Subclasses set `cmd`, their fields, and override what differs."""

    cmd: ClassVar[str] = ""
    shard_timeout: ClassVar[float] = 30.0  # seconds each shard has to answer in a fan-out

    def to_wire(self) -> dict[str, Any]:
        return {"cmd": self.cmd}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Request:
        return cls()

    def split(self, shards: int) -> list[Request]:
        """Each shard's part of the request (the same request for most commands)."""
        return [self] * shards

    def combine(self, replies: Sequence[ShardReply]) -> Any:
        """One answer from the shards' replies (partial when some failed)."""
        return _with_errors(dict(_answered(replies)[0].result), replies)

    def combine_progress(self, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Progress lines from the shards, as one line for the client."""
        totals = [p.get("total") for p in parts]
        return {"pages": sum(p.get("pages", 0) for p in parts),
                "total": sum(totals) if all(t is not None for t in totals) else None}

    def render(self, result: Any) -> str:
        return json.dumps(result, indent=2)


# ---------------------------------------------------------------------------- supervisor-only


@dataclass(frozen=True)
class Ping(Request):
    """Liveness. The supervisor answers its own; a shard answers with its index and pid."""

    cmd: ClassVar[str] = "ping"
    shard_timeout: ClassVar[float] = 5.0


@dataclass(frozen=True)
class Down(Request):
    """swapoff every device, then stop (the supervisor answers once swapoff is done)."""

    cmd: ClassVar[str] = "down"


@dataclass(frozen=True)
class Park(Request):
    """`systemctl restart` (ExecStop=, tierswap/fdstore.py): every shard hands its kit over to
    nobody and exits, then the supervisor exits, swap staying on; systemd's fd store holds the
    kits for the next start."""

    cmd: ClassVar[str] = "park"


@dataclass(frozen=True)
class Restart(Request):
    """Replace every daemon process with one running the code installed now, swap staying on:
    a new supervisor takes the shards over, then replaces them one at a time (issue 10)."""

    cmd: ClassVar[str] = "restart"
    config: str | None = None  # the new processes' config file (absolute); None: the same

    def __post_init__(self) -> None:
        if self.config is not None and not os.path.isabs(self.config):
            raise ControlError("restart: config must be an absolute path")

    def to_wire(self) -> dict[str, Any]:
        return {"cmd": self.cmd} | ({"config": self.config} if self.config else {})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Restart:
        return cls(config=_str(d, "config", required=False))

    def render(self, result: Any) -> str:
        return f"restarting: supervisor pid {result.get('supervisor')} replaces the shards now"


@dataclass(frozen=True)
class Status(Request):
    """The status record (tierswap.status): combined by the supervisor, which knows the shards'
    processes and devices, from each shard's `Stats`."""

    cmd: ClassVar[str] = "status"

    def render(self, result: Any) -> str:
        from tierswap.status import render_table

        return render_table(result)


# ---------------------------------------------------------------------------- shard-internal


@dataclass(frozen=True)
class Stats(Request):
    """A shard's raw counters (device and tier statistics, hardening state). A shard that
    does not answer within STATUS_SHARD_TIMEOUT is shown as unresponsive (with what
    /proc/swaps says of its device): status must answer fast even when a shard is stuck."""

    cmd: ClassVar[str] = "stats"
    shard_timeout: ClassVar[float] = STATUS_SHARD_TIMEOUT


@dataclass(frozen=True)
class Shutdown(Request):
    """Stop serving: the shard takes its own device out of swap first if it is still in."""

    cmd: ClassVar[str] = "shutdown"
    shard_timeout: ClassVar[float] = 5.0


@dataclass(frozen=True)
class Kit(Request):
    """The shard's kit (tierswap/kit.py): its reply carries the fds (SCM_RIGHTS), for the
    supervisor to keep (tierswap/keeper.py). Never part of a fan-out."""

    cmd: ClassVar[str] = "kit"
    shard_timeout: ClassVar[float] = 10.0


@dataclass(frozen=True)
class Handoff(Request):
    """Stop serving for a replacement that takes over the kit: no swapoff, no unmount; the
    kernel holds the requests meanwhile (FUSE_NOTIFY_RESEND brings back unanswered ones)."""

    cmd: ClassVar[str] = "handoff"
    shard_timeout: ClassVar[float] = 30.0


# ---------------------------------------------------------------------------- tier commands


@dataclass(frozen=True)
class Migrate(Request):
    """Move pages from one tier to another, coldest first: a number of pages, of stored bytes,
    or all of them (counts are split evenly across shards)."""

    cmd: ClassVar[str] = "migrate"
    shard_timeout: ClassVar[float] = 24 * HOUR
    src: str = ""
    dst: str = ""
    pages: int | None = None
    bytes: int | None = None
    all: bool = False
    idle_for: float = 0.0

    def __post_init__(self) -> None:
        given = sum((self.pages is not None, self.bytes is not None, self.all))
        if given != 1:
            raise ControlError("migrate: say how much: exactly one of pages, bytes or all")
        if self.src == self.dst:
            raise ControlError("migrate: from and to name the same tier")

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cmd": self.cmd, "from": self.src, "to": self.dst}
        for k in ("pages", "bytes"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.all:
            d["all"] = True
        if self.idle_for:
            d["idle_for"] = self.idle_for
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Migrate:
        return cls(src=_str(d, "from") or "", dst=_str(d, "to") or "", pages=_count(d, "pages"),
                   bytes=_count(d, "bytes"), all=_flag(d, "all"),
                   idle_for=_seconds(d, "idle_for"))

    def split(self, shards: int) -> list[Request]:
        out: list[Request] = []
        for k in range(shards):
            parts = {}
            for key in ("pages", "bytes"):
                n = getattr(self, key)
                if n is not None:
                    share, rem = divmod(n, shards)
                    parts[key] = share + (1 if k < rem else 0)
            # a share that rounds down to nothing is not sent (see Skip)
            out.append(SKIP if 0 in parts.values() else dataclasses.replace(self, **parts))
        return out

    def combine(self, replies: Sequence[ShardReply]) -> dict[str, Any]:
        return _summed(replies)

    def render(self, result: Any) -> str:
        return _moved(result, f"{self.src} -> {self.dst}")


@dataclass(frozen=True)
class Skip(Request):
    """A shard's share of a request that rounds down to nothing: the fan-out does not send it
    and records an empty result for that shard."""

    cmd: ClassVar[str] = ""


SKIP = Skip()


def _moved(result: Mapping[str, Any], label: str, seconds: float | None = None) -> str:
    nbytes = result.get("bytes", 0)
    line = f"moved {result.get('pages', 0)} pages ({format_size(nbytes)} stored) {label}"
    if seconds is not None:
        line += f" in {seconds:.1f}s ({nbytes / 1e6 / seconds if seconds > 0 else 0:.1f} MB/s)"
    return line


@dataclass(frozen=True)
class _TierCommand(Request):
    tier: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "tier": self.tier}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Request:
        return cls(tier=_str(d, "tier") or "")


@dataclass(frozen=True)
class Drain(_TierCommand):
    """Move every page off a tier and stop placing pages there."""

    cmd: ClassVar[str] = "drain"
    shard_timeout: ClassVar[float] = 24 * HOUR

    def combine(self, replies: Sequence[ShardReply]) -> dict[str, Any]:
        return _summed(replies)

    def render(self, result: Any) -> str:
        return _moved(result, f"draining {self.tier}")


@dataclass(frozen=True)
class Undrain(_TierCommand):
    """Let a drained tier take pages again."""

    cmd: ClassVar[str] = "undrain"

    def render(self, result: Any) -> str:
        return f"{self.tier}: accepting pages again"


@dataclass(frozen=True)
class Compact(_TierCommand):
    """Close holes in a file tier and give the space back to its file system."""

    cmd: ClassVar[str] = "compact"
    shard_timeout: ClassVar[float] = 24 * HOUR

    def combine(self, replies: Sequence[ShardReply]) -> dict[str, Any]:
        return _summed(replies)

    def render(self, result: Any) -> str:
        return (f"{self.tier}: moved {result.get('pages', 0)} pages, released "
                f"{format_size(result.get('released_bytes', 0))}")


@dataclass(frozen=True)
class SetPolicy(Request):
    """Show the tiering policy, changing the given keys first (values as the config takes)."""

    cmd: ClassVar[str] = "policy"
    updates: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "set": dict(self.updates)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> SetPolicy:
        s = d.get("set") or {}
        if not isinstance(s, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int | float | bool)
                for k, v in s.items()):
            raise ControlError("policy: 'set' must map keys to plain values")
        return cls(updates=s)

    def render(self, result: Any) -> str:
        return "\n".join(f"{k} = {v}" for k, v in result.items() if k != "errors")


@dataclass(frozen=True)
class Inspect(Request):
    """Per-tier pages, idle ages and fragmentation."""

    cmd: ClassVar[str] = "inspect"
    shard_timeout: ClassVar[float] = 120.0

    def combine(self, replies: Sequence[ShardReply]) -> dict[str, Any]:
        results = [r.result for r in _answered(replies)]
        tiers = []
        for j, t0 in enumerate(results[0]["tiers"]):
            t = dict(t0)
            parts = [r["tiers"][j] for r in results]
            for k in ("pages", "zero_pages", "stored_bytes", "capacity_bytes", "free_extents",
                      "free_bytes"):
                t[k] = sum(p[k] for p in parts)
            t["largest_free_extent"] = max(p["largest_free_extent"] for p in parts)
            t["idle_pages"] = {k: sum(p["idle_pages"][k] for p in parts) for k in t0["idle_pages"]}
            t["draining"] = any(p["draining"] for p in parts)
            stored = t["stored_bytes"]
            t["compression_ratio"] = t["pages"] * PAGE_SIZE / stored if stored else 0.0
            tiers.append(t)
        return _with_errors({"tiers": tiers, "zero_pages": sum(r["zero_pages"] for r in results),
                             "policy": results[0]["policy"]}, replies)

    def render(self, result: Any) -> str:
        lines = [f"{'TIER':<10}{'KIND':<8}{'PAGES':>10}{'STORED':>9}{'RATIO':>7}{'<1m':>9}"
                 f"{'<10m':>9}{'<1h':>9}{'older':>9}{'ZERO':>9}{'FREE EXT':>9}{'LARGEST':>9}"]
        for t in result["tiers"]:
            i = t["idle_pages"]
            lines.append(
                f"{t['name']:<10}{t['kind']:<8}{t['pages']:>10}"
                f"{format_size(t['stored_bytes']):>9}{t['compression_ratio']:>7.2f}"
                f"{i['lt_1m']:>9}{i['lt_10m']:>9}{i['lt_1h']:>9}{i['longer']:>9}"
                f"{t['zero_pages']:>9}{t['free_extents']:>9}"
                f"{format_size(t['largest_free_extent']):>9}"
                + ("  draining" if t["draining"] else ""))
        lines.append(f"zero pages outside tiers: {result['zero_pages']}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- parsing

TIER_COMMANDS: tuple[type[Request], ...] = (Migrate, Drain, Undrain, Compact, SetPolicy, Inspect)
# What the supervisor's public socket takes, and what a shard's private socket takes.
_PUBLIC: tuple[type[Request], ...] = (Ping, Status, Down, Restart, Park, *TIER_COMMANDS)
_SHARD: tuple[type[Request], ...] = (Ping, Stats, Shutdown, Kit, Handoff, *TIER_COMMANDS)
PUBLIC: dict[str, type[Request]] = {c.cmd: c for c in _PUBLIC}
SHARD: dict[str, type[Request]] = {c.cmd: c for c in _SHARD}

_ARGS: dict[str, set[str]] = {
    "migrate": {"from", "to", "pages", "bytes", "all", "idle_for"},
    "drain": {"tier"}, "undrain": {"tier"}, "compact": {"tier"}, "policy": {"set"},
    "restart": {"config"},
}


def parse(wire: Any, allowed: Mapping[str, type[Request]]) -> Request:
    """A request from its wire form; `ControlError` (one line) for anything malformed."""
    if not isinstance(wire, dict) or not isinstance(wire.get("cmd"), str):
        raise ControlError('bad request: expected a JSON object with a "cmd" string')
    cls = allowed.get(wire["cmd"])
    if cls is None:
        raise ControlError(f"unknown command {wire['cmd'][:64]!r}")
    extra = set(wire) - {"cmd"} - _ARGS.get(cls.cmd, set())
    if extra:
        raise ControlError(f"{cls.cmd}: unknown argument {sorted(extra)[0][:64]!r}")
    return cls.from_wire(wire)
