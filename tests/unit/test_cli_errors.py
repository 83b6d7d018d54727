"""Bad input to the `tierswap` command: one line on stderr, a non-zero exit, never a traceback.

Every run points `--config` into tmp_path (run_dir and state_dir there too), so nothing here
touches /run/tierswap, and `up` with a bad config must stop before mounting anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSWAP_")}
    return subprocess.run(
        [sys.executable, "-m", "tierswap", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=60, env=env,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("tierswap:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def good_config(tmp: Path, **over: str) -> str:
    disk = over.get("disk_capacity", '"8M"')
    return (
        f'[daemon]\nstate_dir = "{tmp}/state"\nrun_dir = "{tmp}/run"\n'
        '[device]\nsize = "16M"\nshards = 1\n'
        '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "4M"\n'
        f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{tmp}/disk.tier"\n'
        f"capacity = {disk}\n"
        + over.get("extra", "")
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "tierswap.toml"
    path.write_text(good_config(tmp_path))
    return path


BAD_CONFIGS = {
    "not_toml": ("this is = = not toml [", "not valid TOML"),
    "unknown_key": (None, "device.colour: unknown key"),
    "missing": (None, "no such config file"),
    "too_big_for_fs": (None, "tier[1].capacity"),
}


def bad_config(tmp: Path, which: str) -> Path:
    path = tmp / f"{which}.toml"
    if which == "not_toml":
        path.write_text(BAD_CONFIGS[which][0] or "")
    elif which == "unknown_key":
        path.write_text(good_config(tmp).replace("shards = 1\n", "shards = 1\ncolour = 1\n"))
    elif which == "too_big_for_fs":
        path.write_text(good_config(tmp, disk_capacity='"100P"'))
    return path


# ------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "required: command"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("drain",), "required: tier"),
        (("migrate", "--from", "ram"), "--to"),
        (("migrate", "--from", "ram", "--to", "disk"), "one of the arguments"),
        (("migrate", "--from", "ram", "--to", "disk", "--bytes", "12X"), "--bytes"),
        (("migrate", "--from", "ram", "--to", "disk", "--bytes", "-1"), "--bytes"),
        (("migrate", "--from", "ram", "--to", "disk", "--pages", "0"), "--pages"),
        (("migrate", "--from", "a", "--to", "b", "--pages", "x"), "invalid int value"),
        (("down", "--timeout", "soon"), "invalid float value"),
        (("status", "--bogus"), "unrecognized arguments"),
        (("policy", "rate"), "KEY=VALUE"),
    ],
)
def test_usage_errors(tmp_path: Path, cfg: Path, args: tuple[str, ...], needle: str) -> None:
    extra = ("--config", str(cfg)) if args and args[0] in ("migrate", "policy") else ()
    p = run(*args, *extra)
    line = assert_one_line_error(p, 2, needle)
    assert line.startswith("tierswap: usage error:")
    assert p.stdout == ""


# ------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("which", list(BAD_CONFIGS))
def test_check_config_rejects(tmp_path: Path, which: str) -> None:
    path = bad_config(tmp_path, which)
    p = run("check-config", "--config", str(path))
    line = assert_one_line_error(p, 2, "config error", BAD_CONFIGS[which][1])
    if which in ("not_toml", "missing"):
        assert str(path) in line  # names the file (key errors name the key instead)
    assert p.stdout == ""


def test_check_config_unreadable(tmp_path: Path) -> None:
    p = run("check-config", "--config", str(tmp_path))  # a directory
    assert_one_line_error(p, 2, "cannot read")
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00\x01")
    assert_one_line_error(run("check-config", "--config", str(path)), 2, "cannot read")


def test_check_config_good(cfg: Path) -> None:
    p = run("check-config", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout.strip().startswith(f"{cfg}: ok: 16M virtual, 1 shard(s)")


def fuse_mounts(under: Path) -> list[str]:
    """FUSE mounts at or below `under` (other tests on this machine may mount elsewhere)."""
    with open("/proc/mounts") as f:
        fields = [ln.split() for ln in f]
    return [m[1] for m in fields if "fuse" in m[2] and m[1].startswith(str(under))]


def loop_devices(under: Path) -> list[str]:
    """Attached loop devices whose backing file is at or below `under`."""
    out = []
    for d in Path("/sys/block").glob("loop*"):
        backing = d / "loop" / "backing_file"
        try:
            if backing.read_text().strip().startswith(str(under)):
                out.append(d.name)
        except OSError:  # not attached (or detached meanwhile)
            continue
    return out


@pytest.mark.parametrize("which", list(BAD_CONFIGS))
@pytest.mark.parametrize("foreground", [False, True])
def test_up_with_bad_config_touches_nothing(tmp_path: Path, which: str, foreground: bool) -> None:
    path = bad_config(tmp_path, which)
    args = ["up", "--config", str(path)] + (["--foreground"] if foreground else [])
    p = run(*args)
    assert_one_line_error(p, 2, "config error", BAD_CONFIGS[which][1])
    assert p.stdout == ""
    assert fuse_mounts(tmp_path) == []
    assert loop_devices(tmp_path) == []
    # nothing was created for the run either
    assert sorted(x.name for x in tmp_path.iterdir()) == [path.name] * path.exists()


# ------------------------------------------------------------------------ not running


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("inspect",),
        ("drain", "disk"),
        ("undrain", "disk"),
        ("compact", "disk"),
        ("policy",),
        ("migrate", "--from", "ram", "--to", "disk", "--all"),
    ],
)
def test_commands_when_not_running(tmp_path: Path, cfg: Path, args: tuple[str, ...]) -> None:
    p = run(*args, "--config", str(cfg))
    assert_one_line_error(p, 1, "tierswap: error:", "not running")
    assert p.stdout == ""
    assert not (tmp_path / "run").exists()


def test_status_with_stale_socket(tmp_path: Path, cfg: Path) -> None:
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "control.sock"))  # bound, never listening: connection refused
    try:
        p = run("status", "--config", str(cfg))
    finally:
        s.close()
    assert_one_line_error(p, 1, "not running", "stale")


def test_status_with_bad_config(tmp_path: Path) -> None:
    p = run("status", "--config", str(bad_config(tmp_path, "unknown_key")))
    assert_one_line_error(p, 2, "config error", "device.colour")
