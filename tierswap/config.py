"""TOML configuration: parse, derive "auto" sizes, validate before anything is touched.

Sizes are numbers with units or expressions of RAM (tierswap.sizeexpr); drop-in files
``<config>.d/*.toml`` are merged over the file (tierswap.dropins); a file tier's path may be a
block device (tierswap.blockdev). "auto" on a file tier reuses an existing tier file's size,
so that it does not shrink by the room the file itself takes (tierswap.tierfiles).

Every problem is a `ConfigError` whose text names the file and the key
(``/etc/tierswap/tierswap.toml: tier[1].path: ...``) so the CLI can print it as one line.
Nothing here mounts, creates or starts anything; `check-config` and `up` share this code so
what `check-config` accepts is exactly what `up` runs.

What is refused, and why (docs/configuration.md has the operator's view):
* sizes beyond what can work: at most 20 digits, nothing over MAX_SIZE; device.size per shard
  within one swap area (the swap header counts pages in 32 bits) and with a worst-case slot
  map of at most a quarter of RAM; a memory tier within 3/4 of RAM; a remote tier whose
  sealing state (24 B per 4 KiB) fits in a quarter of RAM.
* two tiers on one thing: file paths compared after normalisation (and by inode when they
  exist), NBD exports compared as normalised (host, port, export), within and across tiers.
* a file-tier path that tierswap uses otherwise (anything under run_dir or a shard's
  directory under state_dir, the config file itself), that is neither a regular file nor a
  block device, or that exists without tierswap's tier-file header (tierswap.tiers.file)
  unless the tier says ``overwrite = true``: an operator's file is never truncated,
  overwritten or chmod'ed; a block device that is mounted, active swap or held by another
  device (nor any of its partitions).
* a shared directory as run_dir or state_dir: system directories (/, /tmp, /run, ...), home
  directories, a directory not owned by root (or us) or writable by group or others, or,
  when it does not exist yet, one whose nearest existing parent is writable by others; and a
  run_dir holding things tierswap did not put there (its clean-up acts on what is inside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from tierswap import dropins, sizeexpr, tierfiles
from tierswap.blockdev import is_block_device
from tierswap.errors import ConfigError

PAGE_SIZE = 4096
DEFAULT_CONFIG_PATH = Path("/etc/tierswap/tierswap.toml")
TIER_KINDS = ("memory", "file", "remote")
_ERASURE_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
MAX_SIZE_DIGITS = 20
MAX_SIZE = 1 << 60  # no size anywhere may exceed this (1 EiB)
# Pages in one swap area: the swap header's last_page is 32 bits (and one page is the header).
MAX_SWAP_PAGES = (1 << 32) - 2
# Worst case of the slot map per page (one page per run); tierswap.device sizes the map with it.
MAP_BYTES_PER_PAGE = 96
SEAL_BYTES_PER_BLOCK = 24  # nonce counter and tag per 4 KiB block of a sealed tier
# Background moves at fewer bytes/s than this would sleep for seconds per run while holding
# the policy lock; above the maximum the limit means nothing.
MIN_POLICY_RATE = 1 << 20
MAX_POLICY_RATE = 1 << 40
AUTO_FILE_MAX = 8 << 30  # "auto" on a new tier file: min(RAM / 2, this, free room / 4)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string such as "512M", "1.5G", "4096" (1024-based units), or
    an expression of RAM such as "min(ram / 2, 4G)" (tierswap.sizeexpr)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as \"2G\", got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        if len(m.group(1)) > MAX_SIZE_DIGITS:
            raise ConfigError(f"{key}: too large ({len(m.group(1))} digits)")
        n = int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])  # exact, no float overflow
    elif isinstance(value, str) and value != "auto" and sizeexpr.looks_like_expression(value):
        try:
            n = sizeexpr.evaluate(value, {"ram": machine_ram})
        except ValueError as e:
            raise ConfigError(f"{key}: expected a size such as \"2G\" or \"min(ram / 2, 4G)\", "
                              f"got {value[:60]!r}: {e}") from None
        if n <= 0:
            raise ConfigError(f"{key}: size must be positive, {value!r} is {n} bytes here")
    else:
        raise ConfigError(f"{key}: expected a size such as \"2G\", got {str(value)[:40]!r}")
    if n <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    if n > MAX_SIZE:
        raise ConfigError(f"{key}: too large (at most {format_size(MAX_SIZE)})")
    return n


# device.swapon_options: the discard policy, in the words of fstab / swapon(8)
SWAPON_DISCARD = {"discard": "--discard", "discard=once": "--discard=once",
                  "discard=pages": "--discard=pages"}


def parse_swapon_options(value: Any, key: str) -> tuple[str, ...]:
    """swapon(8) flags from "discard", "discard=once", "discard=pages" or "" (none).

    Only the discard policy is an option here: the priority is device.priority, and the
    other swapon options (nofail, noauto) are fstab's, not a running device's."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string such as \"discard\", got {value!r}")
    opts = [o.strip() for o in value.split(",") if o.strip()]
    if opts in ([], ["none"]):
        return ()
    for o in opts:
        if o.startswith("pri="):
            raise ConfigError(f"{key}: {o!r}: the priority is device.priority")
        if o not in SWAPON_DISCARD:
            raise ConfigError(f"{key}: unknown option {o[:40]!r} (use \"discard\", "
                              f"\"discard=once\", \"discard=pages\" or \"\" for none)")
    if len(opts) > 1:
        raise ConfigError(f"{key}: give one discard policy, got {value!r}")
    return (SWAPON_DISCARD[opts[0]],)


def format_size(n: float) -> str:
    """Human size in the style of zramctl (1024-based, one decimal where useful)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Compression:
    algorithm: str  # "zstd", "lz4" or "none"
    level: int = 0  # zstd: -7..19; lz4: acceleration (1 = default, higher = faster)

    @classmethod
    def parse(cls, value: Any, key: str) -> Compression:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected \"zstd:LEVEL\" or \"none\", got {value!r}")
        if value == "none":
            return cls("none")
        algo, _, level = value.partition(":")
        if algo == "lz4":
            try:
                accel = int(level) if level else 1
            except ValueError:
                raise ConfigError(f"{key}: bad lz4 acceleration in {value!r}") from None
            if not 1 <= accel <= 64:
                raise ConfigError(f"{key}: lz4 acceleration must be within 1..64, got {accel}")
            return cls("lz4", accel)
        if algo != "zstd":
            raise ConfigError(
                f"{key}: unknown compression {value!r} (use \"zstd:LEVEL\", \"lz4\" or "
                f"\"none\")"
            )
        try:
            lvl = int(level) if level else 1
        except ValueError:
            raise ConfigError(f"{key}: bad zstd level in {value!r}") from None
        if not -7 <= lvl <= 19:
            raise ConfigError(f"{key}: zstd level must be within -7..19, got {lvl}")
        return cls("zstd", lvl)

    def __str__(self) -> str:
        if self.algorithm == "none":
            return "none"
        if self.algorithm == "lz4":
            return "lz4" if self.level == 1 else f"lz4:{self.level}"
        return f"zstd:{self.level}"


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str
    capacity: int
    compression: Compression = Compression("zstd", 1)
    path: Path | None = None  # file tier
    encrypt: bool = False  # file tier (remote is always encrypted)
    targets: tuple[str, ...] = ()  # remote tier
    replicas: int = 1  # remote tier
    tls_ca: str | None = None  # remote tier
    overwrite: bool = False  # file tier: may replace an existing file that is not a tier file
    erasure: tuple[int, int] | None = None  # remote tier: (K data, M parity) fragments
    repair_rate: int = 64 << 20  # remote tier: bytes/s of rebuild and resync traffic
    # pages idle recompress_after seconds are recompressed to this in the background, and
    # pages moved into the tier are recompressed on the way (None: keep bytes as stored)
    recompress: Compression | None = None
    recompress_after: float = 30.0
    block: bool = False  # file tier: `path` is a block device (tierswap.blockdev)
    sizing: str = ""  # how the capacity was derived when not given as a size ("auto: ...")


@dataclass(frozen=True)
class PolicyConfig:
    """Demotion/promotion knobs; see docs/configuration.md. Changeable at runtime."""

    high_watermark: float = 0.90  # fraction of a tier's capacity that starts demotion
    low_watermark: float = 0.80  # demotion stops here
    idle_age: float = 0.0  # seconds; pages idle longer are demoted (0 = off)
    rate: int = 256 << 20  # bytes/s of background moves
    promote: bool = True  # move pages read again from a slower tier up


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None  # node_exporter textfile collector path
    listen: str | None = None  # "127.0.0.1:9110"
    interval: float = 15.0


@dataclass(frozen=True)
class Config:
    state_dir: Path
    run_dir: Path
    size: int  # virtual capacity in bytes, a multiple of PAGE_SIZE * shards
    priority: int
    shards: int
    tiers: tuple[TierConfig, ...]
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<default>"
    allow_unlocked_memory: bool = False  # serve even when mlockall fails (tierswap.hardening)
    swapon_flags: tuple[str, ...] = ("--discard",)  # from device.swapon_options
    sources: tuple[str, ...] = ()  # every file read, in order: the config, then its drop-ins

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# machine facts used for "auto" (kept as functions so tests can substitute them)


def machine_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("cannot read MemTotal from /proc/meminfo")


def fs_free(path: Path) -> int:
    """Free bytes on the file system that would hold `path` (nearest existing ancestor)."""
    p = path
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------------------------


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = f"{where}.{key}" if where else key
            raise ConfigError(f"{hint}: unknown key")


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table [{key}]")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key}: expected an integer within {lo}..{hi}, got {value!r}")
    return value


def _float(value: Any, key: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{key}: expected a number within {lo}..{hi}, got {value!r}")
    return float(value)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _abs_path(value: Any, key: str) -> Path:
    p = Path(_str(value, key))
    if not p.is_absolute():
        raise ConfigError(f"{key}: expected an absolute path, got {value!r}")
    return p


def parse_policy(table: dict[str, Any], base: PolicyConfig | None = None) -> PolicyConfig:
    """Policy from a TOML table or from `policy KEY=VALUE` updates (values already typed)."""
    base = base or PolicyConfig()
    _check_keys(table, {f.name for f in dataclasses.fields(PolicyConfig)}, "policy")
    vals = dataclasses.asdict(base)
    for key, value in table.items():
        k = f"policy.{key}"
        if key in ("high_watermark", "low_watermark"):
            vals[key] = _float(value, k, 0.0, 1.0)
        elif key == "idle_age":
            vals[key] = _float(value, k, 0.0, 10 * 365 * 86400)
        elif key == "rate":
            rate = parse_size(value, k)
            if not MIN_POLICY_RATE <= rate <= MAX_POLICY_RATE:
                raise ConfigError(f"{k}: must be within {format_size(MIN_POLICY_RATE)}.."
                                  f"{format_size(MAX_POLICY_RATE)} per second, got {value!r}")
            vals[key] = rate
        elif key == "promote":
            if not isinstance(value, bool):
                raise ConfigError(f"{k}: expected true or false, got {value!r}")
            vals[key] = value
    pol = PolicyConfig(**vals)
    if pol.low_watermark > pol.high_watermark:
        raise ConfigError("policy.low_watermark: must not exceed policy.high_watermark")
    return pol


def _parse_tier(i: int, t: Any, ram: int, state_dir: Path, check_fs: bool) -> TierConfig:
    where = f"tier[{i}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table [[tier]]")
    kind = t.get("kind")
    if kind not in TIER_KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(TIER_KINDS)}, got {kind!r}")
    allowed = {"name", "kind", "capacity", "compression", "recompress", "recompress_after"}
    allowed |= {"file": {"path", "encrypt", "overwrite"},
                "remote": {"targets", "replicas", "tls_ca", "erasure", "repair_rate"}}.get(
        kind, set()
    )
    _check_keys(t, allowed, where)
    name = t.get("name", kind)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: expected a short lowercase name, got {name!r}")
    comp = Compression.parse(t.get("compression", "zstd:1"), f"{where}.compression")
    cap_raw = t.get("capacity")
    if cap_raw is None:
        raise ConfigError(f"{where}.capacity: missing")
    path: Path | None = None
    if kind == "file":
        if "path" not in t:
            raise ConfigError(f"{where}.path: missing (a file tier needs a path)")
        path = _abs_path(t["path"], f"{where}.path")
    sizing = ""
    block = kind == "file" and path is not None and is_block_device(path)
    if kind == "file" and not block and path is not None and path.is_relative_to("/dev"):
        # never create a tier file among device nodes (a volume not activated yet)
        raise ConfigError(f"{where}.path: {path} is not a block device (does it exist yet?)")
    if kind == "file" and path is not None:
        capacity, sizing = tierfiles.file_capacity(where, path, cap_raw, ram, block)
    elif cap_raw == "auto":
        if kind == "memory":
            capacity, sizing = min(ram // 4, 4 << 30), "auto: min(RAM / 4, 4G)"
        else:
            raise ConfigError(f"{where}.capacity: \"auto\" is not available for a remote tier")
    else:
        capacity = parse_size(cap_raw, f"{where}.capacity")
    capacity -= capacity % (1 << 20)
    if capacity < (4 << 20):
        raise ConfigError(f"{where}.capacity: must be at least 4M, got {cap_raw!r}")
    if kind == "memory" and capacity > ram * 3 // 4:
        raise ConfigError(f"{where}.capacity: {format_size(capacity)} of locked RAM is more than "
                          f"3/4 of this machine's {format_size(ram)}")
    if kind == "remote" and capacity // 4096 * SEAL_BYTES_PER_BLOCK > ram // 4:
        raise ConfigError(
            f"{where}.capacity: {format_size(capacity)} needs "
            f"{format_size(capacity // 4096 * SEAL_BYTES_PER_BLOCK)} of sealing state in RAM, "
            f"more than a quarter of this machine's {format_size(ram)}")
    encrypt = t.get("encrypt", False)
    if not isinstance(encrypt, bool):
        raise ConfigError(f"{where}.encrypt: expected true or false, got {encrypt!r}")
    overwrite = t.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"{where}.overwrite: expected true or false, got {overwrite!r}")
    if kind == "file" and check_fs and block:
        assert path is not None
        tierfiles.check_tier_device(path, where, overwrite)
    elif kind == "file" and check_fs:
        assert path is not None
        check_tier_file(path, where, overwrite)
        have = fs_free(path.parent) + (path.stat().st_size if path.exists() else 0)
        if capacity > have:
            raise ConfigError(
                f"{where}.capacity: {format_size(capacity)} exceeds the free room "
                f"({format_size(have)}) of the file system holding {path}"
            )
    targets: tuple[str, ...] = ()
    replicas = 1
    tls_ca = None
    erasure = None
    repair_rate = TierConfig.repair_rate
    if kind == "remote":
        raw = t.get("targets")
        if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{where}.targets: expected a list of nbd:// URLs")
        from tierswap.nbd import parse_nbd_url  # deferred: only remote tiers need it

        for j, url in enumerate(raw):
            try:
                parse_nbd_url(url)
            except ValueError as e:
                raise ConfigError(f"{where}.targets[{j}]: {e}") from None
        targets = tuple(raw)
        replicas = _int(t.get("replicas", 1), f"{where}.replicas", 1, len(targets))
        if "tls_ca" in t:
            tls_ca = str(_abs_path(t["tls_ca"], f"{where}.tls_ca"))
        if "erasure" in t:
            if "replicas" in t:
                raise ConfigError(f"{where}.erasure: exclusive with replicas (set one of them)")
            erasure = _parse_erasure(t["erasure"], f"{where}.erasure", len(targets))
        if "repair_rate" in t:
            repair_rate = parse_size(t["repair_rate"], f"{where}.repair_rate")
    recompress = None
    if "recompress" in t:
        recompress = Compression.parse(t["recompress"], f"{where}.recompress")
    recompress_after = _float(t.get("recompress_after", 30.0), f"{where}.recompress_after", 0.0,
                              30 * 86400.0)
    return TierConfig(name, kind, capacity, comp, path, encrypt, targets, replicas, tls_ca,
                      overwrite, erasure, repair_rate, recompress, recompress_after, block,
                      sizing)


def _parse_erasure(value: Any, key: str, ntargets: int) -> tuple[int, int]:
    """(K, M) from "K+M": K data and M parity fragments per segment, each on its own target."""
    m = _ERASURE_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(f"{key}: expected \"K+M\" such as \"4+2\", got {value!r}")
    k, p = int(m.group(1)), int(m.group(2))
    if not 1 <= k <= 64 or p < 1:
        raise ConfigError(f"{key}: need 1 <= K <= 64 data and M >= 1 parity fragments, "
                          f"got {value!r}")
    if k + p > ntargets:
        raise ConfigError(f"{key}: {k}+{p} needs {k + p} targets (one per fragment), "
                          f"only {ntargets} configured")
    return k, p


def parse_config(text: str, source: str = "<string>", *, check_fs: bool = True) -> Config:
    """Parse and validate; `check_fs=False` skips checks against this machine's file systems.

    Every error names `source` (the file) and the key."""
    try:
        return _parse_config(text, source, check_fs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{source}: ") else f"{source}: {msg}") from None


def _parse_config(text: str, source: str, check_fs: bool) -> Config:
    return _parse_document(_toml(text, source), source, check_fs)


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None


def _parse_document(doc: dict[str, Any], source: str, check_fs: bool) -> Config:
    _check_keys(doc, {"daemon", "device", "tier", "policy", "metrics"}, "")
    ram = machine_ram()

    daemon = _table(doc, "daemon")
    _check_keys(daemon, {"state_dir", "run_dir", "allow_unlocked_memory"}, "daemon")
    state_dir = _abs_path(daemon.get("state_dir", "/var/lib/tierswap"), "daemon.state_dir")
    run_dir = _abs_path(daemon.get("run_dir", "/run/tierswap"), "daemon.run_dir")
    state_dir, run_dir = Path(os.path.normpath(state_dir)), Path(os.path.normpath(run_dir))
    if state_dir == run_dir:
        raise ConfigError("daemon.run_dir: must differ from daemon.state_dir")
    for key, d in (("daemon.state_dir", state_dir), ("daemon.run_dir", run_dir)):
        check_private_dir(d, key, check_fs=check_fs, run_dir=key == "daemon.run_dir")
    if state_dir.is_relative_to(run_dir) or run_dir.is_relative_to(state_dir):
        raise ConfigError("daemon.run_dir: must not be inside daemon.state_dir, nor contain it")
    allow_unlocked = daemon.get("allow_unlocked_memory", False)
    if not isinstance(allow_unlocked, bool):
        raise ConfigError(f"daemon.allow_unlocked_memory: expected true or false, "
                          f"got {allow_unlocked!r}")

    device = _table(doc, "device")
    _check_keys(device, {"size", "priority", "shards", "swapon_options"}, "device")
    shards_raw = device.get("shards", 1)
    if shards_raw == "auto":
        shards = max(1, min(os.cpu_count() or 1, 4))
    else:
        shards = _int(shards_raw, "device.shards", 1, 16)
    size_raw = device.get("size", "auto")
    size = ram if size_raw == "auto" else parse_size(size_raw, "device.size")
    unit = PAGE_SIZE * shards
    derived = isinstance(size_raw, str) and (size_raw == "auto" or not _SIZE_RE.match(size_raw))
    if derived:  # "auto" and expressions of RAM: nobody can name a multiple
        size -= size % unit
    elif size % unit:
        raise ConfigError(
            f"device.size: must be a multiple of {unit} bytes (4 KiB pages x {shards} shards)"
        )
    if size // shards < 16 * PAGE_SIZE:  # mkswap wants at least 10 pages; keep some room
        raise ConfigError(f"device.size: too small ({size} bytes for {shards} shard(s))")
    if size // PAGE_SIZE * MAP_BYTES_PER_PAGE > ram // 4:
        most = ram // 4 // MAP_BYTES_PER_PAGE * PAGE_SIZE
        need = size // PAGE_SIZE * MAP_BYTES_PER_PAGE
        raise ConfigError(f"device.size: {format_size(size)} is too large for this machine: its "
                          f"slot map could need {format_size(need)} (at most a quarter of RAM, "
                          f"so at most {format_size(most)})")
    if size // shards // PAGE_SIZE > MAX_SWAP_PAGES:
        raise ConfigError(f"device.size: {format_size(size // shards)} per shard exceeds one swap "
                          f"area ({format_size(MAX_SWAP_PAGES * PAGE_SIZE)}); use more shards")
    priority = _int(device.get("priority", 100), "device.priority", -1, 32767)
    swapon_flags = parse_swapon_options(device.get("swapon_options", "discard"),
                                        "device.swapon_options")

    raw_tiers = doc.get("tier")
    if raw_tiers is None:
        raise ConfigError("tier: at least one [[tier]] is required")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise ConfigError("tier: expected one or more [[tier]] tables")
    tiers = tuple(_parse_tier(i, t, ram, state_dir, check_fs) for i, t in enumerate(raw_tiers))
    names = [t.name for t in tiers]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"tier: duplicate tier name {n!r}")
    _check_tier_places(tiers, state_dir, run_dir, source, check_fs)
    for t in tiers:
        if t.capacity // shards < (1 << 20):
            i = names.index(t.name)
            raise ConfigError(f"tier[{i}].capacity: too small for {shards} shards")

    policy = parse_policy(_table(doc, "policy"))

    metrics = _table(doc, "metrics")
    _check_keys(metrics, {"textfile", "listen", "interval"}, "metrics")
    textfile = _abs_path(metrics["textfile"], "metrics.textfile") if "textfile" in metrics else None
    listen = None
    if "listen" in metrics:
        listen = _str(metrics["listen"], "metrics.listen")
        host, _, port = listen.rpartition(":")
        if host not in ("127.0.0.1", "::1", "[::1]", "localhost") or not port.isdigit():
            raise ConfigError(
                f"metrics.listen: expected a localhost address such as \"127.0.0.1:9110\", "
                f"got {listen!r}"
            )
    interval = _float(metrics.get("interval", 15.0), "metrics.interval", 1.0, 3600.0)

    return Config(
        state_dir=state_dir,
        run_dir=run_dir,
        size=size,
        priority=priority,
        shards=shards,
        tiers=tiers,
        policy=policy,
        metrics=MetricsConfig(textfile, listen, interval),
        source=source,
        allow_unlocked_memory=allow_unlocked,
        swapon_flags=swapon_flags,
    )


# --------------------------------------------------------------------------------------------
# where tiers and directories may be


# Directories that are shared by their nature: never run_dir or state_dir (start-up would
# chmod them, crash clean-up would act on other programs' mounts and loop devices in them).
SHARED_DIRS = frozenset(map(Path, (
    "/", "/tmp", "/run", "/var/tmp", "/dev", "/dev/shm", "/home", "/root", "/var", "/var/lib",
    "/var/run", "/var/cache", "/var/log", "/etc", "/usr", "/usr/local", "/opt", "/srv", "/mnt",
    "/media", "/boot", "/proc", "/sys", "/run/user", "/run/lock", "/var/lock")))

# What tierswap itself keeps in run_dir (supervisor.py, cli.py, daemon.py): anything else
# there means the directory is not tierswap's alone.
_RUN_DIR_ENTRY = re.compile(
    r"^(shard\d+|control\.sock|tierswap\.(pid|log)|state\.(json|tmp)|\.?[\w.-]+\.(lock|tmp))$")


def home_dirs() -> set[Path]:
    """Home directories of the accounts on this machine (a run_dir there is shared)."""
    import pwd

    try:
        return {Path(os.path.normpath(e.pw_dir)) for e in pwd.getpwall() if e.pw_dir}
    except OSError:  # pragma: no cover - no passwd database
        return set()


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def check_private_dir(d: Path, key: str, *, check_fs: bool = True,
                      run_dir: bool = False) -> None:
    """Refuse a directory that is not fit to be tierswap's own (see the module docstring)."""
    resolved = Path(os.path.realpath(d)) if check_fs else d
    for p in {d, resolved}:
        if p in SHARED_DIRS or p in home_dirs():
            raise ConfigError(f"{key}: {d} is a shared directory; give tierswap a directory of "
                              f"its own (such as {p}/tierswap)")
    if not check_fs:
        return
    p = resolved
    while True:
        try:
            st = os.stat(p)
            break
        except FileNotFoundError:
            p = p.parent
        except OSError as e:
            raise ConfigError(f"{key}: cannot check {p}: {e.strerror}") from None
    if p == resolved:
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{key}: {d} exists and is not a directory")
        if not _trusted(st):
            raise ConfigError(f"{key}: {d} is not owned by root or is writable by group or "
                              f"others; tierswap will not use or chmod a directory like that")
        if run_dir:
            try:
                foreign = sorted(n for n in os.listdir(d) if not _RUN_DIR_ENTRY.match(n))
            except OSError as e:
                raise ConfigError(f"{key}: cannot list {d}: {e.strerror}") from None
            if foreign:
                raise ConfigError(f"{key}: {d} holds {foreign[0]!r}, which is not tierswap's; "
                                  f"the run directory must be tierswap's alone")
    elif not _trusted(st):
        raise ConfigError(f"{key}: {d} would be created in {p}, which is not owned by root or "
                          f"is writable by group or others")


def check_tier_file(path: Path, where: str, overwrite: bool) -> None:
    """An existing file-tier path must be a regular file with tierswap's tier-file header,
    unless `overwrite` says the operator wants it replaced."""
    from tierswap.tiers.file import read_mark  # deferred: only file tiers need it

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{where}.path: cannot check {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ConfigError(f"{where}.path: {path} is {kind}")
    if overwrite:
        return
    try:
        marked = read_mark(path) is not None
    except OSError as e:
        raise ConfigError(f"{where}.path: cannot read {path}: {e.strerror}") from None
    if not marked:
        raise ConfigError(f"{where}.path: {path} exists and is not a tier file tierswap made; "
                          f"refusing to overwrite it (set {where}.overwrite = true to allow that)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev  # two nodes (or links) of one device
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def nbd_export_key(url: str) -> tuple[str, int, str]:
    """(host, port, export) of an NBD URL, normalised so that two spellings of one export
    compare equal (host case, IPv6 brackets and zero compression, a trailing dot)."""
    from tierswap.nbd import parse_nbd_url  # deferred: only remote tiers need it

    t = parse_nbd_url(url)
    host = t.host.strip("[]").rstrip(".").lower()
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    if host in ("localhost", "localhost.localdomain", "::1"):
        host = "127.0.0.1"  # one loopback, whichever way it is written
    return host, t.port, t.export


def _check_tier_places(tiers: tuple[TierConfig, ...], state_dir: Path, run_dir: Path,
                       source: str, check_fs: bool) -> None:
    """No two tiers on one file or export; no file tier on something tierswap uses itself."""
    seen_paths: list[tuple[int, Path]] = []
    seen_exports: dict[tuple[str, int, str], str] = {}
    config_file = Path(os.path.normpath(source)) if source.startswith("/") else None
    for i, t in enumerate(tiers):
        where = f"tier[{i}]"
        if t.path is not None:
            p = Path(os.path.normpath(t.path))
            real = Path(os.path.realpath(p)) if check_fs else p
            for q in {p, real}:
                if q.is_relative_to(run_dir) or (check_fs and q.is_relative_to(
                        os.path.realpath(run_dir))):
                    raise ConfigError(f"{where}.path: {t.path} is inside daemon.run_dir, which "
                                      f"tierswap uses itself")
                rel = q.relative_to(state_dir) if q.is_relative_to(state_dir) else None
                if q == state_dir or (rel is not None and len(rel.parts) > 1
                                      and rel.parts[0].startswith("shard")):
                    raise ConfigError(f"{where}.path: {t.path} is where tierswap keeps a "
                                      f"shard's slot map (daemon.state_dir/shardN)")
                if config_file is not None and q == config_file:
                    raise ConfigError(f"{where}.path: {t.path} is the configuration file")
            for j, other in seen_paths:
                if other in (p, real) or (check_fs and _same_file(other, p)):
                    raise ConfigError(f"{where}.path: {t.path} is also tier[{j}]'s file")
            seen_paths.append((i, real))
        for k, url in enumerate(t.targets):
            try:
                key = nbd_export_key(url)
            except ValueError as e:
                raise ConfigError(f"{where}.targets[{k}]: {e}") from None
            if key in seen_exports:
                raise ConfigError(f"{where}.targets[{k}]: {url} is the same NBD export as "
                                  f"{seen_exports[key]}; their pages would overwrite each other")
            seen_exports[key] = f"{where}.targets[{k}] ({url})"


def make_private_dir(d: Path) -> None:
    """Create `d` (and missing parents) mode 0700; an existing directory is left as it is.

    Config validation has checked that an existing one is root's and not writable by others;
    chmod'ing it would change a directory that may not be ours alone."""
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        p = p.parent
    old = os.umask(0o077)
    try:
        for m in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(m, 0o700)
    finally:
        os.umask(old)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or not _trusted(st):
        raise OSError(f"{d} is not a private directory of root's")


def default_config_text() -> str:
    return resources.files("tierswap").joinpath("default.toml").read_text()


def load_config(path: Path | str | None = None, *, check_fs: bool = True) -> Config:
    """Load `path`, or the default path, or (when that does not exist) the embedded default;
    then the drop-ins of `<path>.d/` over it (tierswap.dropins; the default path's drop-ins
    also apply over the embedded default)."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            source, text = "<embedded default>", default_config_text()
        else:
            source, text = str(DEFAULT_CONFIG_PATH), _read(DEFAULT_CONFIG_PATH)
        dropdir = Path(f"{DEFAULT_CONFIG_PATH}.d")
    else:
        source, text = str(path), _read(Path(path))
        dropdir = Path(f"{path}.d")
    doc = _toml(text, source)
    origins: dict[str, str] = {}
    sources = [source]
    for f in dropins.files(dropdir):
        dropins.merge(doc, _toml(_read(f), str(f)), str(f), origins)
        sources.append(str(f))
    try:
        cfg = _parse_document(doc, source, check_fs)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(f"{source}: "):
            raise
        raise ConfigError(f"{dropins.origin_of(msg, origins) or source}: {msg}") from None
    return dataclasses.replace(cfg, sources=tuple(sources))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None

