"""TOML configuration: parse, derive "auto" sizes, validate before anything is touched.

Every problem is a `ConfigError` whose text names the key (``tier[1].path: ...``) so the CLI can
print it as one line. Nothing here mounts, creates or starts anything; `check-config` and `up`
share this code so what `check-config` accepts is exactly what `up` runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PAGE_SIZE = 4096
DEFAULT_CONFIG_PATH = Path("/etc/tierswap/tierswap.toml")
TIER_KINDS = ("memory", "file", "remote")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class ConfigError(Exception):
    """A configuration problem, worded for a one-line message that names the key."""


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string such as "512M", "1.5G", "4096" (1024-based units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as \"2G\", got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ConfigError(f"{key}: expected a size such as \"2G\", got {value!r}")
    if n <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    return n


def format_size(n: float) -> str:
    """Human size in the style of zramctl (1024-based, one decimal where useful)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Compression:
    algorithm: str  # "zstd" or "none"
    level: int = 0

    @classmethod
    def parse(cls, value: Any, key: str) -> Compression:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected \"zstd:LEVEL\" or \"none\", got {value!r}")
        if value == "none":
            return cls("none")
        algo, _, level = value.partition(":")
        if algo != "zstd":
            raise ConfigError(
                f"{key}: unknown compression {value!r} (use \"zstd:LEVEL\" or \"none\")"
            )
        try:
            lvl = int(level) if level else 1
        except ValueError:
            raise ConfigError(f"{key}: bad zstd level in {value!r}") from None
        if not -7 <= lvl <= 19:
            raise ConfigError(f"{key}: zstd level must be within -7..19, got {lvl}")
        return cls("zstd", lvl)

    def __str__(self) -> str:
        return "none" if self.algorithm == "none" else f"zstd:{self.level}"


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

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def shard_dir(self, shard: int) -> Path:
        return self.run_dir / f"shard{shard}"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tierswap.pid"


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
            vals[key] = parse_size(value, k)
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
    allowed = {"name", "kind", "capacity", "compression"}
    allowed |= {"file": {"path", "encrypt"}, "remote": {"targets", "replicas", "tls_ca"}}.get(
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
    if cap_raw == "auto":
        if kind == "memory":
            capacity = min(ram // 4, 4 << 30)
        elif kind == "file":
            assert path is not None
            capacity = min(ram, fs_free(path.parent) // 4)
        else:
            raise ConfigError(f"{where}.capacity: \"auto\" is not available for a remote tier")
    else:
        capacity = parse_size(cap_raw, f"{where}.capacity")
    capacity -= capacity % (1 << 20)
    if capacity < (4 << 20):
        raise ConfigError(f"{where}.capacity: must be at least 4M, got {cap_raw!r}")
    encrypt = t.get("encrypt", False)
    if not isinstance(encrypt, bool):
        raise ConfigError(f"{where}.encrypt: expected true or false, got {encrypt!r}")
    if kind == "file" and check_fs:
        assert path is not None
        have = fs_free(path.parent) + (path.stat().st_size if path.exists() else 0)
        if capacity > have:
            raise ConfigError(
                f"{where}.capacity: {format_size(capacity)} exceeds the free room "
                f"({format_size(have)}) of the file system holding {path}"
            )
    targets: tuple[str, ...] = ()
    replicas = 1
    tls_ca = None
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
    return TierConfig(name, kind, capacity, comp, path, encrypt, targets, replicas, tls_ca)


def parse_config(text: str, source: str = "<string>", *, check_fs: bool = True) -> Config:
    """Parse and validate; `check_fs=False` skips checks against this machine's file systems."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    _check_keys(doc, {"daemon", "device", "tier", "policy", "metrics"}, "")
    ram = machine_ram()

    daemon = _table(doc, "daemon")
    _check_keys(daemon, {"state_dir", "run_dir"}, "daemon")
    state_dir = _abs_path(daemon.get("state_dir", "/var/lib/tierswap"), "daemon.state_dir")
    run_dir = _abs_path(daemon.get("run_dir", "/run/tierswap"), "daemon.run_dir")
    if state_dir == run_dir:
        raise ConfigError("daemon.run_dir: must differ from daemon.state_dir")

    device = _table(doc, "device")
    _check_keys(device, {"size", "priority", "shards"}, "device")
    shards_raw = device.get("shards", 1)
    if shards_raw == "auto":
        shards = max(1, min(os.cpu_count() or 1, 4))
    else:
        shards = _int(shards_raw, "device.shards", 1, 16)
    size_raw = device.get("size", "auto")
    size = ram if size_raw == "auto" else parse_size(size_raw, "device.size")
    unit = PAGE_SIZE * shards
    if size_raw == "auto":
        size -= size % unit
    elif size % unit:
        raise ConfigError(
            f"device.size: must be a multiple of {unit} bytes (4 KiB pages x {shards} shards)"
        )
    if size // shards < 16 * PAGE_SIZE:  # mkswap wants at least 10 pages; keep some room
        raise ConfigError(f"device.size: too small ({size} bytes for {shards} shard(s))")
    priority = _int(device.get("priority", 100), "device.priority", -1, 32767)

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
    paths = [t.path for t in tiers if t.path is not None]
    if len(set(paths)) != len(paths):
        raise ConfigError("tier: two file tiers share one path")
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
    )


def default_config_text() -> str:
    return resources.files("tierswap").joinpath("default.toml").read_text()


def load_config(path: Path | str | None = None, *, check_fs: bool = True) -> Config:
    """Load `path`, or the default path, or (when that does not exist) the embedded default."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return parse_config(default_config_text(), "<embedded default>", check_fs=check_fs)
        path = DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse_config(text, str(path), check_fs=check_fs)
