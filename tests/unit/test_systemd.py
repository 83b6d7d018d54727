"""The systemd unit, the example configuration and `check-config`, as .ci/install installs them.

`systemd-analyze verify` loads the unit with the host's systemd (no running systemd needed),
checks every key and runs a start transaction, which is where an ordering cycle shows. It
exits 0 even when it prints warnings, so the test treats any output as a failure, except for
complaints about the host's own unit files (see `_host_noise`).
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tierswap import cli, config

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "tierswap.service"
EXAMPLE = ROOT / "systemd" / "tierswap.toml.example"
INSTALL = ROOT / ".ci" / "install"
BINARY = "/usr/local/sbin/tierswap"  # the link .ci/install (or, for development, .ci/setup) makes

# Settings that run the unit's processes in a mount namespace of their own (or close off
# devices): the FUSE mounts would then be invisible outside ExecStart's own process.
NAMESPACING = {
    "PrivateMounts", "PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "RootDirectory", "RootImage", "MountAPIVFS", "MountFlags", "DynamicUser",
    "ProtectClock", "DeviceAllow", "DevicePolicy", "PrivateNetwork", "PrivateUsers",
    "NetworkNamespacePath", "IPAddressDeny",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values, as systemd reads them: keys repeat, an empty value resets."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        key, value = key.strip(), value.strip()
        if value:
            current.setdefault(key, []).append(value)
        else:
            current[key] = []
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.split()]


# ---------------------------------------------------------------------------- verify


def _host_noise(line: str) -> bool:
    """A complaint about a unit file of the host's, not about ours.

    verify also loads what the unit refers to (swap.target, local-fs.target, shutdown.target,
    sys-fs-fuse-connections.mount, and what those pull in); a host whose own units carry, say,
    a key its systemd no longer knows prints "/lib/systemd/system/x.service:12: ..." for them.
    Those lines are filtered, and only those: anything about tierswap.service, an ordering
    cycle or a missing executable still fails.
    """
    m = re.match(r"^(/\S+?):\d+: ", line)
    return bool(m) and Path(m.group(1)).name != UNIT.name and not m.group(1).startswith(
        str(ROOT))


def _verify(path: Path) -> tuple[int, list[str]]:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    p = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, env=env, timeout=120)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return p.returncode, lines


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


@needs_analyze
def test_systemd_analyze_verify_is_clean():
    if not os.access(BINARY, os.X_OK):
        pytest.skip(f"{BINARY} is missing (run .ci/setup or .ci/install); verify checks ExecStart "
                    "exists")
    rc, lines = _verify(UNIT)
    problems = [ln for ln in lines if not _host_noise(ln)]
    assert rc == 0 and problems == [], "\n".join(lines)


@needs_analyze
def test_verify_would_catch_the_swap_target_cycle(tmp_path):
    """Why DefaultDependencies=no: with default dependencies the unit is ordered after
    sysinit.target, which is after swap.target, which must come after the unit."""
    if not os.access(BINARY, os.X_OK):
        pytest.skip(f"{BINARY} is missing (run .ci/setup)")
    copy = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "\nDefaultDependencies=no\n" in text
    copy.write_text(text.replace("\nDefaultDependencies=no\n", "\n"))
    _, lines = _verify(copy)
    assert any("ordering cycle" in ln for ln in lines), "\n".join(lines)


# ---------------------------------------------------------------------------- directives


def test_unit_type_and_commands(unit):
    svc = unit["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["NotifyAccess"] == ["main"]
    assert svc["ExecStart"] == [f"{BINARY} up --foreground"]
    # a restart keeps swap on (the fd store holds the kits); a stop is a swapoff
    assert svc["ExecStartPre"] == [f"{BINARY} down --force --quiet --unless-restarting"]
    assert svc["ExecStop"] == [f"{BINARY} down --unless-restarting"]
    assert svc["ExecReload"] == [f"{BINARY} restart --timeout 240"]
    assert svc["ExecStopPost"] == [f"{BINARY} down --force --quiet --unless-restarting"]
    assert svc["Restart"] == ["on-failure"] and svc["RestartSec"]
    assert svc["KillMode"] == ["control-group"]  # shards get SIGTERM and swapoff themselves


def test_unit_keeps_kits_and_run_dir_across_a_restart(unit):
    """What a restart restores from: the fd store (room for every kit fd of many shards) and
    the run directory (state.json names each shard's loop device; the mount points)."""
    svc = unit["Service"]
    assert int(svc["FileDescriptorStoreMax"][0]) >= 512
    assert svc["RuntimeDirectoryPreserve"] == ["restart"]
    # FDSTORE= is accepted from the main process, which is the supervisor
    assert svc["NotifyAccess"] in (["main"], ["all"])
    # systemd 252 (Debian 12) has no FileDescriptorStorePreserve= (254+)
    assert "FileDescriptorStorePreserve" not in svc


def test_unit_timeouts_and_watchdog(unit):
    svc = unit["Service"]
    assert svc["WatchdogSec"] == ["30"]
    # the signal every tierswap process handles as a stop (never the default abort and core)
    from tierswap.tasks import STOP_SIGNALS, WATCHDOG_SIGNAL

    assert svc["WatchdogSignal"] == [signal.Signals(WATCHDOG_SIGNAL).name]
    assert WATCHDOG_SIGNAL in STOP_SIGNALS
    assert "TimeoutAbortSec" not in svc or svc["TimeoutAbortSec"] == svc["TimeoutStopSec"]
    assert svc["TimeoutStopSec"] == ["30min"]  # swapoff pulls every page back
    assert svc["TimeoutStartSec"] == ["5min"]


def test_unit_memory_protection(unit):
    svc = unit["Service"]
    assert svc["OOMScoreAdjust"] == ["-1000"]
    assert svc["LimitMEMLOCK"] == ["infinity"]
    assert svc["LimitCORE"] == ["0"]  # no core of page memory or keys
    assert svc["MemorySwapMax"] == ["0"]
    assert svc["OOMPolicy"] == ["continue"]
    assert svc["ManagedOOMPreference"] == ["omit"]
    assert "MemoryMax" not in svc and "MemoryHigh" not in svc


def test_unit_ordering(unit):
    u = unit["Unit"]
    assert "swap.target" in words(u["Before"])
    assert "local-fs.target" in words(u["After"])
    assert u["DefaultDependencies"] == ["no"]
    assert "shutdown.target" in words(u["Conflicts"]) and "shutdown.target" in words(u["Before"])
    # network ordering would be a cycle with Before=swap.target (docs/operations.md)
    assert not {"network.target", "network-online.target"} & set(
        words(u.get("After", []) + u.get("Wants", []) + u.get("Requires", [])))
    assert unit["Install"]["WantedBy"] == ["swap.target"]


def test_unit_privileges(unit):
    svc = unit["Service"]
    assert set(words(svc["CapabilityBoundingSet"])) == {
        "CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE"}
    assert svc["NoNewPrivileges"] == ["yes"]
    assert "User" not in svc  # root: mount, losetup, swapon
    assert svc["UMask"] == ["0077"]
    assert svc["StateDirectory"] == ["tierswap"] and svc["StateDirectoryMode"] == ["0700"]
    assert svc["RuntimeDirectory"] == ["tierswap"] and svc["RuntimeDirectoryMode"] == ["0700"]
    # the directories systemd creates are the ones the embedded default uses
    default = config.parse_config(config.default_config_text(), check_fs=False)
    assert default.state_dir == Path("/var/lib/tierswap")
    assert default.run_dir == Path("/run/tierswap")


def test_unit_has_no_mount_namespace(unit):
    used = set(unit["Service"]) & NAMESPACING
    assert not used, f"{used} would hide the FUSE mounts from the host and from ExecStop"


def test_install_links_what_the_unit_refers_to():
    """The unit runs BINARY; the install makes it (tests/integration/test_install.py runs it)."""
    text = INSTALL.read_text()
    assert 'SBIN="$ROOT/usr/local/sbin"' in text
    assert 'ln -sfn "$VENV/bin/tierswap" "$SBIN/tierswap"' in text
    assert 'UNIT_DIR="$ROOT/usr/local/lib/systemd/system"' in text
    assert "systemctl enable" not in text.replace("systemctl enable --now tierswap'", "")
    assert "systemctl start" not in text


# ---------------------------------------------------------------------------- example config


@pytest.fixture
def fixed_machine(monkeypatch):
    """Free space changes between two reads; "auto" must not make the comparison flaky."""
    monkeypatch.setattr(config, "machine_ram", lambda: 16 << 30)
    monkeypatch.setattr(config, "fs_free", lambda path: 200 << 30)


def test_example_config_is_the_embedded_default(fixed_machine):
    example = config.parse_config(EXAMPLE.read_text(), "example")
    default = config.parse_config(config.default_config_text(), "default")
    assert example == config.dataclasses.replace(default, source="example")


def test_example_remote_tier_block_is_valid(fixed_machine):
    """The commented remote tier, uncommented, is what config.py accepts."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [[tier]]")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("#"):
            break
        block.append(ln[2:])
    cfg = config.parse_config("\n".join(lines[:start] + block + lines[start + len(block):]),
                              check_fs=False)
    remote = cfg.tier("net")
    assert remote.kind == "remote" and remote.replicas == 2 and len(remote.targets) == 2
    assert remote.tls_ca == "/etc/tierswap/ca.pem"


def _relocated_example(tmp_path: Path) -> tuple[Path, Path]:
    """The example with every path under a directory that does not exist."""
    absent = tmp_path / "absent"
    text = (EXAMPLE.read_text()
            .replace('"/var/lib/tierswap', f'"{absent}/lib')
            .replace('"/run/tierswap"', f'"{absent}/run"'))
    path = tmp_path / "tierswap.toml"
    path.write_text(text)
    return path, absent


def test_check_config_cli_accepts_the_example_and_creates_nothing(tmp_path):
    path, absent = _relocated_example(tmp_path)
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{path}: ok: ") and p.stderr == ""
    assert "ram (memory" in p.stdout and "disk (file" in p.stdout
    assert not absent.exists()


def test_check_config_rejects_a_bad_file_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(EXAMPLE.read_text().replace('priority = 100', 'priority = "high"'))
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(f"tierswap: config error: {path}: device.priority:")
    assert p.stderr.count("\n") == 1


@pytest.fixture
def no_writes(monkeypatch):
    """Fail any attempt to create a directory or open a file for writing."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"check-config tried to write: {args}")

    real_os_open, real_open = os.open, builtins.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *a, **kw):
        if flags & writing:
            refuse(path, flags)
        return real_os_open(path, flags, *a, **kw)

    def guarded_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            refuse(file, mode)
        return real_open(file, mode, *a, **kw)

    for name in ("mkdir", "makedirs", "rename", "replace", "unlink", "remove", "rmdir",
                 "symlink", "link", "truncate", "posix_fallocate", "chmod", "mknod"):
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.mark.parametrize("which", ["embedded default", "example"])
def test_check_config_touches_nothing(which, no_writes, monkeypatch, capsys):
    """In-process, with every way of writing refused, for both shipped configurations."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", Path("/nonexistent/tierswap.toml"))
    argv = ["check-config"] if which == "embedded default" else [
        "check-config", "--config", str(EXAMPLE)]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.startswith("<embedded default>: ok:" if which == "embedded default"
                              else f"{EXAMPLE}: ok:")
