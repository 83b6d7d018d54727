"""Configuration that must be refused before anything is touched (issue 8, item 14).

Each case used to be accepted: a size of hundreds of digits raised OverflowError, "4P" was a
valid device, one NBD export could back two tiers, `/x/../x` was not a duplicate of `/x`, a
file-tier path could be any existing file (start-up then truncated and chmod'ed it), and /tmp
was a fine run_dir (start-up chmod'ed it to 0700). Every refusal is one line naming the
file and the key.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.unit.test_config import GIB, make, reject
from tierswap import config as C
from tierswap.config import ConfigError, make_private_dir, parse_config, parse_size
from tierswap.tiers.file import HEADER, NotATierFile, prepare_file, read_mark


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16 GiB machine of test_config.py, with room everywhere."""
    monkeypatch.setattr(C, "machine_ram", lambda: 16 * GIB)
    monkeypatch.setattr(C, "fs_free", lambda path: 400 * GIB)


def remote(urls: list[str], name: str = "net", capacity: str = "64M") -> str:
    quoted = ", ".join(f'"{u}"' for u in urls)
    return (f'[[tier]]\nname = "{name}"\nkind = "remote"\ncapacity = "{capacity}"\n'
            f"targets = [{quoted}]\n")


RAM = '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "8M"\n'


# ------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("value", ["9" * 400, "1." + "5" * 400 + "G", "9" * 21, "1" * 19 + "P"])
def test_huge_sizes_are_one_line_errors(value):
    with pytest.raises(ConfigError, match="too large"):
        parse_size(value, "device.size")


def test_huge_toml_integer(tmp_path):
    reject(make(tmp_path, device=f"size = {1 << 62}"), "device.size:", "too large")


@pytest.mark.parametrize("size", ['"4P"', '"1T"', '"171G"'])
def test_device_size_beyond_the_slot_map_budget(tmp_path, size):
    # the fixture machine has 16 GiB: a worst-case map of a quarter of it allows 170 GiB
    reject(make(tmp_path, device=f"size = {size}"), "device.size:", "too large for this machine")
    parse_config(make(tmp_path, device='size = "170G"'), "t.toml", check_fs=False)


def test_device_size_beyond_one_swap_area(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "machine_ram", lambda: 1 << 50)
    reject(make(tmp_path, device='size = "32T"\nshards = 1'), "device.size:", "swap area")
    parse_config(make(tmp_path, device='size = "30T"\nshards = 2'), "t.toml", check_fs=False)


def test_memory_tier_within_ram(tmp_path):
    tiers = '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "13G"\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].capacity:", "locked RAM")
    parse_config(make(tmp_path, tiers=tiers.replace("13G", "12G")), "t.toml", check_fs=False)


def test_remote_tier_sealing_state_within_ram(tmp_path):
    reject(make(tmp_path, tiers=RAM + remote(["nbd://h/x"], capacity="1T")),
           "tier[1].capacity:", "sealing state")
    assert 16 * GIB // 4 // 24 * 4096 > 512 * GIB
    parse_config(make(tmp_path, tiers=RAM + remote(["nbd://h/x"], capacity="512G")), "t.toml",
                 check_fs=False)


# ------------------------------------------------------------------------ duplicates


@pytest.mark.parametrize(("a", "b"), [
    ("nbd://h/x", "nbd://h/x"),
    ("nbd://h/x", "nbd://H:10809/x"),
    ("nbd://h./x", "nbd://h/x"),
    ("nbd://[::1]/x", "nbd://localhost/x"),
    ("nbd://127.0.0.1:10809/x", "nbds://localhost/x"),
    ("nbd://[2001:db8::1]/x", "nbd://[2001:DB8:0::1]:10809/x"),
    ("nbd://h/a%20b", "nbd://h/a b"),
])
def test_one_export_twice_in_a_tier(tmp_path, a, b):
    text = make(tmp_path, tiers=RAM + remote([a, b]))
    reject(text, "tier[1].targets[1]:", "same NBD export", "tier[1].targets[0]")


def test_one_export_in_two_tiers(tmp_path):
    text = make(tmp_path, tiers=RAM + remote(["nbd://h/x", "nbd://g/x"], "one")
                + remote(["nbd://k/x", "nbd://G:10809/x"], "two"))
    reject(text, "tier[2].targets[1]:", "same NBD export", "tier[1].targets[1]")


def test_different_exports_are_fine(tmp_path):
    text = make(tmp_path, tiers=RAM + remote(["nbd://h/x", "nbd://h/y", "nbd://h:10810/x"]))
    assert len(parse_config(text, "t.toml", check_fs=False).tiers[1].targets) == 3


def _file(name: str, path: str, extra: str = "") -> str:
    return f'[[tier]]\nname = "{name}"\nkind = "file"\ncapacity = "8M"\npath = "{path}"\n{extra}'


@pytest.mark.parametrize("spelling", ["{d}/x/../x/f", "{d}/x/./f", "{d}//x/f", "{d}/x/f/"])
def test_file_paths_are_normalised_for_duplicates(tmp_path, spelling):
    tiers = RAM + _file("a", f"{tmp_path}/x/f") + _file("b", spelling.format(d=tmp_path))
    reject(make(tmp_path, tiers=tiers), "tier[2].path:", "also tier[1]'s file")


def test_two_names_of_one_file(tmp_path):
    (tmp_path / "x").mkdir()
    prepare_file(tmp_path / "x" / "f", 8 << 20)
    os.link(tmp_path / "x" / "f", tmp_path / "hard")
    tiers = RAM + _file("a", f"{tmp_path}/x/f") + _file("b", f"{tmp_path}/hard")
    reject(make(tmp_path, tiers=tiers), "tier[2].path:", "also tier[1]'s file", check_fs=True)


# ------------------------------------------------------------------------ what a file tier may be


@pytest.mark.parametrize("where", ["{d}/run/x.tier", "{d}/run/shard0/mnt/swap.img",
                                   "{d}/state/shard0/map/data.mdb", "{d}/state",
                                   "{d}/state/shard3/disk.tier", "{d}/run/../run/control.sock"])
def test_file_tier_on_what_tierswap_uses_itself(tmp_path, where):
    tiers = RAM + _file("disk", where.format(d=tmp_path))
    reject(make(tmp_path, tiers=tiers), "tier[1].path:")


def test_file_tier_directly_in_state_dir_is_fine(tmp_path):
    tiers = RAM + _file("disk", f"{tmp_path}/state/disk.tier")  # the default layout
    parse_config(make(tmp_path, tiers=tiers), "t.toml", check_fs=True)


def test_file_tier_on_the_config_file(tmp_path):
    cfg = tmp_path / "tierswap.toml"
    cfg.write_text(make(tmp_path, tiers=RAM + _file("disk", str(cfg))))
    with pytest.raises(ConfigError, match=r"tier\[1\]\.path: .* is the configuration file"):
        C.load_config(cfg, check_fs=False)


def test_an_existing_file_that_is_not_ours_is_refused_and_left_alone(tmp_path):
    victim = tmp_path / "precious"
    victim.write_bytes(b"the operator's data\n" * 1000)
    victim.chmod(0o644)
    before = victim.read_bytes()
    text = make(tmp_path, tiers=RAM + _file("disk", str(victim)))
    msg = reject(text, "tier[1].path:", str(victim), "not a tier file", "tier[1].overwrite",
                 check_fs=True)
    assert "\n" not in msg
    # and the layer below refuses too (a file that appeared after validation)
    with pytest.raises(NotATierFile):
        prepare_file(victim, 8 << 20)
    assert victim.read_bytes() == before and stat.S_IMODE(victim.stat().st_mode) == 0o644
    # unless the operator says so
    text = make(tmp_path, tiers=RAM + _file("disk", str(victim), "overwrite = true\n"))
    parse_config(text, "t.toml", check_fs=True)
    prepare_file(victim, 8 << 20, overwrite=True)
    assert read_mark(victim) is not None and victim.stat().st_size == HEADER + (8 << 20)


def test_a_tier_file_we_made_is_reused(tmp_path):
    path = tmp_path / "disk.tier"
    prepare_file(path, 8 << 20)
    ident = read_mark(path).id
    parse_config(make(tmp_path, tiers=RAM + _file("disk", str(path))), "t.toml", check_fs=True)
    prepare_file(path, 16 << 20)  # resized: still the same tier file
    mark = read_mark(path)
    assert mark.id == ident and mark.capacity == 16 << 20


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_file_tier_path_that_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "odd"
    if kind == "symlink":
        prepare_file(tmp_path / "real", 8 << 20)
        path.symlink_to(tmp_path / "real")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    reject(make(tmp_path, tiers=RAM + _file("disk", str(path), "overwrite = true\n")),
           "tier[1].path:", check_fs=True)
    with pytest.raises(OSError):
        prepare_file(path, 8 << 20, overwrite=kind != "directory")


async def test_file_tier_refuses_to_open_an_unmarked_file(tmp_path):
    from tierswap.tiers.base import TierError
    from tierswap.tiers.file import FileTier

    path = tmp_path / "plain"
    path.write_bytes(bytes(16 << 20))
    cfg = parse_config(make(tmp_path, tiers=_file("disk", str(path))), "t.toml", check_fs=False)
    with pytest.raises(TierError, match="not a tier file"):
        await FileTier.create(cfg.tiers[0], 0, cfg, 0)


# ------------------------------------------------------------------------ directories


@pytest.mark.parametrize("shared", ["/", "/tmp", "/run", "/var/tmp", "/dev/shm", "/root",
                                    "/home", "/tmp/../run", "/var/lib"])
@pytest.mark.parametrize("key", ["run_dir", "state_dir"])
def test_shared_directories_are_refused(tmp_path, shared, key):
    other = "state_dir" if key == "run_dir" else "run_dir"
    text = (f'[daemon]\n{key} = "{shared}"\n{other} = "{tmp_path}/{other}"\n'
            f'[device]\nsize = "64M"\n{RAM}')
    reject(text, f"daemon.{key}:", "shared directory")


def test_a_home_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "home_dirs", lambda: {tmp_path / "alice"})
    text = make(tmp_path, daemon="").replace(f'run_dir = "{tmp_path}/run"',
                                             f'run_dir = "{tmp_path}/alice"')
    reject(text, "daemon.run_dir:", "shared directory")


def test_a_directory_writable_by_others_is_refused(tmp_path):
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "run").chmod(0o777)
    reject(make(tmp_path), "daemon.run_dir:", "writable by group or others", check_fs=True)
    (tmp_path / "run").chmod(0o700)
    parse_config(make(tmp_path), "t.toml", check_fs=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_directory_owned_by_someone_else_is_refused(tmp_path):
    (tmp_path / "state").mkdir(mode=0o700)
    os.chown(tmp_path / "state", 65534, 65534)
    reject(make(tmp_path), "daemon.state_dir:", "not owned by root", check_fs=True)


def test_a_new_directory_inside_a_world_writable_one_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    text = make(tmp_path).replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{shared}/ts"')
    reject(text, "daemon.run_dir:", "would be created in", check_fs=True)


def test_a_run_dir_holding_other_things_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    for ours in ("control.sock", "tierswap.pid", "state.json", "tierswap.log", "shard0"):
        (run / ours).touch()
    parse_config(make(tmp_path), "t.toml", check_fs=True)
    (run / "user").mkdir()
    reject(make(tmp_path), "daemon.run_dir:", "'user'", "not tierswap's", check_fs=True)


def test_run_dir_and_state_dir_must_not_nest(tmp_path):
    text = make(tmp_path).replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{tmp_path}/state/r"')
    reject(text, "daemon.run_dir:", "inside")


def test_make_private_dir_never_chmods_an_existing_directory(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    make_private_dir(existing)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    new = tmp_path / "a" / "b" / "c"
    make_private_dir(new)
    for p in (tmp_path / "a", tmp_path / "a" / "b", new):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


# ------------------------------------------------------------------------ from the command line


def test_check_config_names_file_and_key_and_touches_nothing(tmp_path):
    victim = tmp_path / "precious"
    victim.write_bytes(b"keep me")
    cfg = tmp_path / "t.toml"
    cfg.write_text(make(tmp_path, tiers=RAM + _file("disk", str(victim))))
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p
    assert p.stderr.startswith(f"tierswap: config error: {cfg}: tier[1].path: {victim}")
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert victim.read_bytes() == b"keep me"
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


def test_hundreds_of_digits_from_the_command_line(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(make(tmp_path, device=f'size = "{"9" * 400}"'))
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"tierswap: config error: {cfg}: device.size: too large")
