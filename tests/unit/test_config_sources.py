"""Issue 11's configuration: size expressions of RAM, "auto" file tiers that are the same at
every start, device.swapon_options, and drop-in files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierswap import config as C
from tierswap import sizeexpr, system
from tierswap.config import ConfigError, load_config, parse_config, parse_size
from tierswap.tiers.file import HEADER, prepare_file, read_mark

GIB, MIB = 1 << 30, 1 << 20


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "machine_ram", lambda: 16 * GIB)
    monkeypatch.setattr(C, "fs_free", lambda path: 400 * GIB)


def make(tmp: Path, *, device: str = 'size = "64M"\nshards = 1', tiers: str | None = None,
         extra: str = "") -> str:
    if tiers is None:
        tiers = ('[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "8M"\n\n'
                 f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{tmp}/disk.tier"\n'
                 'capacity = "16M"\n')
    return (f'[daemon]\nstate_dir = "{tmp}/state"\nrun_dir = "{tmp}/run"\n\n'
            f"[device]\n{device}\n\n{tiers}\n{extra}\n")


def one_line(e: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------ size expressions


@pytest.mark.parametrize(("text", "n"), [
    ("ram / 2", 8 * GIB),
    ("min(ram / 2, 4G)", 4 * GIB),
    ("max(ram / 2, 12G)", 12 * GIB),
    ("MIN(ram/2,4G)".lower(), 4 * GIB),
    ("(ram - 1G) / 3", 5 * GIB),
    ("ram * 1.5", 24 * GIB),
    ("2G + 512MiB", 2 * GIB + 512 * MIB),
    ("4 G * 2", 8 * GIB),
    ("-1G + ram", 15 * GIB),
    ("ram / 3", (16 * GIB) // 3),  # exact, then rounded down to whole bytes
    ("min(ram, 1T, 100G)", 16 * GIB),
])
def test_size_expressions(text: str, n: int) -> None:
    assert parse_size(text, "k") == n


@pytest.mark.parametrize(("text", "why"), [
    ("ram ** 2", "Pow is not allowed"),
    ("ram // 2", "FloorDiv is not allowed"),
    ("ram % 3", "Mod is not allowed"),
    ("__import__('os')", "__import__() is not allowed"),
    ("ram.real", "Attribute is not allowed"),
    ("(lambda: 1)()", "not allowed"),
    ("swap / 2", "unknown name 'swap' (known: ram)"),
    ("_lit0 + 1G", "reserved"),
    ("ram / 0", "division by zero"),
    ("ram / (1G - 1G)", "division by zero"),
    ("min()", "min() is not allowed"),
    ("min(ram, key=1)", "min() is not allowed"),
    ("1e9 + ram", "Constant is not allowed"),
    ("0x10 + ram", "Constant is not allowed"),
    ("'4G' + ram", "Constant is not allowed"),
    ("ram +", "not a size expression"),
    ("ram " + "+ 1" * 100, "longer than"),
    ("ram < 4G", "not allowed"),
])
def test_size_expressions_refused_in_one_line(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(text, "tier[1].capacity")
    msg = one_line(e)
    assert msg.startswith("tier[1].capacity: expected a size such as"), msg
    assert why in msg, msg


@pytest.mark.parametrize("text", ["ram - ram", "1G - 2G", "min(ram, -1)"])
def test_size_expression_must_be_positive(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^k: size must be positive"):
        parse_size(text, "k")


def test_size_expression_upper_bound() -> None:
    with pytest.raises(ConfigError, match="too large"):
        parse_size("ram * 1P", "k")


def test_ram_is_read_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ram() -> int:
        raise AssertionError("machine_ram called for an expression without ram")

    monkeypatch.setattr(C, "machine_ram", no_ram)
    assert parse_size("1G + 1G", "k") == 2 * GIB


@given(a=st.integers(0, 1 << 20), b=st.integers(0, 1 << 20), unit=st.sampled_from("KMG"))
def test_expression_arithmetic_is_exact(a: int, b: int, unit: str) -> None:
    u = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    assert sizeexpr.evaluate(f"{a}{unit} + {b}", {}) == a * u + b
    assert sizeexpr.evaluate(f"max({a}, {b}) * 3 / 2", {}) == max(a, b) * 3 // 2


def test_expressions_in_the_config(tmp_path: Path) -> None:
    tiers = ('[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "min(ram / 4, 1G)"\n'
             f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{tmp_path}/d"\n'
             'capacity = "ram / 3"\n')
    cfg = parse_config(make(tmp_path, device='size = "ram / 3"\nshards = 3', tiers=tiers),
                       check_fs=False)
    assert cfg.size == (16 * GIB // 3) // (3 * 4096) * (3 * 4096)  # rounded to pages x shards
    assert cfg.tier("ram").capacity == GIB
    assert cfg.tier("disk").capacity == (16 * GIB // 3) // MIB * MIB
    with pytest.raises(ConfigError, match=r"^t.toml: device.size: expected a size"):
        parse_config(make(tmp_path, device='size = "ram / swap"'), "t.toml", check_fs=False)


# ------------------------------------------------------------------------ "auto" file tiers


class Disk:
    """A file system of `total` bytes whose free room is what the tier file leaves."""

    def __init__(self, total: int, path: Path) -> None:
        self.total, self.path = total, path

    def free(self, _p: Path) -> int:
        used = self.path.stat().st_blocks * 512 if self.path.exists() else 0
        return self.total - used


AUTO_TIERS = ('[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "8M"\n'
              '[[tier]]\nname = "disk"\nkind = "file"\npath = "{p}"\ncapacity = "auto"\n')


def test_auto_file_tier_is_the_same_at_every_start(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: up, down, up failed because "auto" shrank by the room the file takes."""
    path = tmp_path / "disk.tier"
    disk = Disk(400 * MIB, path)
    monkeypatch.setattr(C, "fs_free", disk.free)
    monkeypatch.setattr(C, "machine_ram", lambda: 2 * GIB)  # bound RAM / 2 = 1G: free binds
    text = make(tmp_path, tiers=AUTO_TIERS.format(p=path))
    sizes = []
    for _start in range(3):
        cfg = parse_config(text, check_fs=True)  # the supervisor
        tier = cfg.tier("disk")
        prepare_file(tier.path, tier.capacity)  # type: ignore[arg-type]
        shard = parse_config(text, check_fs=False)  # each shard re-reads the file
        assert shard.tier("disk").capacity == tier.capacity
        assert path.stat().st_size >= HEADER + tier.capacity
        sizes.append(tier.capacity)
    assert sizes == [100 * MIB] * 3  # a quarter of 400M, then reused
    assert cfg.tier("disk").sizing == "auto: the size of the existing tier file"


def test_auto_new_file_is_conservative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "disk.tier"
    text = make(tmp_path, tiers=AUTO_TIERS.format(p=path))
    monkeypatch.setattr(C, "machine_ram", lambda: 64 * GIB)
    tier = parse_config(text, check_fs=False).tier("disk")
    assert tier.capacity == 8 * GIB  # not RAM, not a quarter of 400G
    assert tier.sizing == "auto: min(RAM / 2, 8G, a quarter of the free room)"
    monkeypatch.setattr(C, "machine_ram", lambda: 4 * GIB)
    assert parse_config(text, check_fs=False).tier("disk").capacity == 2 * GIB


def test_auto_resizes_a_tier_file_beyond_the_bound_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "disk.tier"
    prepare_file(path, 64 * MIB)
    monkeypatch.setattr(C, "machine_ram", lambda: 64 * MIB)  # now RAM / 2 = 32M
    tier = parse_config(make(tmp_path, device='size = "16M"',
                             tiers=AUTO_TIERS.format(p=path).replace('"8M"', '"4M"')),
                        check_fs=True).tier("disk")
    assert tier.capacity == 32 * MIB
    assert "the existing tier file (64M) is resized" in tier.sizing
    done = prepare_file(path, tier.capacity)
    assert done == f"resized the tier file {path} from 64M to 32M"
    assert path.stat().st_size == HEADER + 32 * MIB
    assert prepare_file(path, tier.capacity) == f"reusing the existing tier file {path} (32M)"
    mark = read_mark(path)
    assert mark is not None and mark.capacity == 32 * MIB


def test_check_config_says_how_auto_was_sized(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(make(tmp_path, tiers=AUTO_TIERS.format(p=tmp_path / "disk.tier")))
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{cfg}: ok: ")
    assert any(ln.startswith("tier disk: ") and "auto: min(RAM / 2, 8G" in ln for ln in lines)
    assert lines[-1] == f"read: {cfg}"
    assert not (tmp_path / "disk.tier").exists()  # check-config preallocates nothing


# ------------------------------------------------------------------------ swapon_options


@pytest.mark.parametrize(("value", "flags"), [
    (None, ("--discard",)),  # the default: freed swap slots reach the tiers
    ('"discard"', ("--discard",)),
    ('"discard=pages"', ("--discard=pages",)),
    ('"discard=once"', ("--discard=once",)),
    ('" discard=once "', ("--discard=once",)),
    ('""', ()),
    ('"none"', ()),
])
def test_swapon_options(tmp_path: Path, value: str | None, flags: tuple[str, ...]) -> None:
    device = 'size = "64M"' + (f"\nswapon_options = {value}" if value else "")
    assert parse_config(make(tmp_path, device=device), check_fs=False).swapon_flags == flags


@pytest.mark.parametrize(("value", "why"), [
    ('"discard=always"', "unknown option 'discard=always'"),
    ('"nofail"', "unknown option 'nofail'"),
    ('"pri=5"', "the priority is device.priority"),
    ('"discard=once,discard=pages"', "give one discard policy"),
    ("true", "expected a string"),
])
def test_swapon_options_refused(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(make(tmp_path, device=f'size = "64M"\nswapon_options = {value}'), "t.toml",
                     check_fs=False)
    msg = one_line(e)
    assert msg.startswith("t.toml: device.swapon_options: ") and why in msg, msg


def test_swapon_is_called_with_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(system, "run", lambda argv, **kw: calls.append(argv) or "")
    system.swapon("/dev/loop7", 100, ("--discard=once",))
    system.swapon("/dev/loop7", 5, ())
    assert calls == [["swapon", "--discard=once", "--priority", "100", "/dev/loop7"],
                     ["swapon", "--priority", "5", "/dev/loop7"]]


# ------------------------------------------------------------------------ drop-ins


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_drop_ins_merge_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path / "tierswap.toml", make(tmp_path, extra="[policy]\nrate = \"64M\"\n"))
    d = tmp_path / "tierswap.toml.d"
    b = write(d / "20-b.toml", "[device]\npriority = 7\n")
    a = write(d / "10-a.toml", "[device]\npriority = 5\nswapon_options = \"discard=once\"\n")
    write(d / "30-ignored.conf", "[device]\npriority = 9\n")
    write(d / ".40-hidden.toml", "[device]\npriority = 9\n")
    cfg = load_config(main, check_fs=False)
    assert cfg.priority == 7  # 20-b after 10-a
    assert cfg.swapon_flags == ("--discard=once",)  # 10-a's other key is kept
    assert cfg.size == 64 * MIB and cfg.policy.rate == 64 * MIB  # the main file's
    assert cfg.sources == (str(main), str(a), str(b))
    assert cfg.source == str(main)


def test_drop_in_tiers_merge_by_name(tmp_path: Path) -> None:
    main = write(tmp_path / "t.toml", make(tmp_path))
    write(tmp_path / "t.toml.d/50-disk.toml",
          '[[tier]]\nname = "disk"\ncapacity = "32M"\n\n'
          f'[[tier]]\nname = "cold"\nkind = "file"\npath = "{tmp_path}/cold.tier"\n'
          'capacity = "64M"\n')
    cfg = load_config(main, check_fs=False)
    assert [t.name for t in cfg.tiers] == ["ram", "disk", "cold"]  # order kept, new appended
    disk = cfg.tier("disk")
    assert disk.capacity == 32 * MIB and disk.path == tmp_path / "disk.tier"  # path kept
    assert cfg.tier("cold").capacity == 64 * MIB


def test_drop_in_arrays_are_replaced(tmp_path: Path) -> None:
    tiers = ('[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "8M"\n'
             '[[tier]]\nname = "net"\nkind = "remote"\ncapacity = "16M"\n'
             'targets = ["nbd://a/x", "nbd://b/x"]\n')
    main = write(tmp_path / "t.toml", make(tmp_path, tiers=tiers))
    write(tmp_path / "t.toml.d/a.toml", '[[tier]]\nname = "net"\ntargets = ["nbd://c/y"]\n')
    assert load_config(main, check_fs=False).tier("net").targets == ("nbd://c/y",)


def test_drop_in_errors_name_the_drop_in(tmp_path: Path) -> None:
    main = write(tmp_path / "t.toml", make(tmp_path))
    bad = write(tmp_path / "t.toml.d/20-bad.toml", '[[tier]]\nname = "disk"\ncapacity = "12X"\n')
    with pytest.raises(ConfigError) as e:
        load_config(main, check_fs=False)
    assert one_line(e).startswith(f"{bad}: tier[1].capacity: expected a size")
    bad.write_text("[device\n")
    with pytest.raises(ConfigError) as e:
        load_config(main, check_fs=False)
    assert one_line(e).startswith(f"{bad}: not valid TOML")
    bad.write_text('[device]\ncolour = "blue"\n')
    with pytest.raises(ConfigError) as e:
        load_config(main, check_fs=False)
    assert one_line(e) == f"{bad}: device.colour: unknown key"
    # what the main file says wrong is still the main file's
    bad.unlink()
    main.write_text(make(tmp_path, device='size = "12X"'))
    with pytest.raises(ConfigError, match=rf"^{main}: device.size"):
        load_config(main, check_fs=False)


def test_drop_ins_writable_by_others_are_refused(tmp_path: Path) -> None:
    main = write(tmp_path / "t.toml", make(tmp_path))
    f = write(tmp_path / "t.toml.d/10-x.toml", "[device]\npriority = 1\n")
    os.chmod(f, 0o666)
    with pytest.raises(ConfigError) as e:
        load_config(main, check_fs=False)
    assert one_line(e).startswith(f"{f}: not owned by root or writable by group or others")
    os.chmod(f, 0o644)
    os.chmod(f.parent, 0o777)
    with pytest.raises(ConfigError, match=rf"^{f.parent}: not owned by root"):
        load_config(main, check_fs=False)
    os.chmod(f.parent, 0o755)
    assert load_config(main, check_fs=False).priority == 1


def test_drop_in_path_that_is_not_a_directory(tmp_path: Path) -> None:
    main = write(tmp_path / "t.toml", make(tmp_path))
    write(tmp_path / "t.toml.d", "x")
    with pytest.raises(ConfigError, match="expected a directory of drop-in files"):
        load_config(main, check_fs=False)


def test_drop_ins_apply_over_the_embedded_default(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "DEFAULT_CONFIG_PATH", tmp_path / "tierswap.toml")  # absent
    f = write(tmp_path / "tierswap.toml.d/50-local.toml",
              f'[daemon]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
              f'[[tier]]\nname = "disk"\npath = "{tmp_path}/state/disk.tier"\n')
    cfg = load_config(check_fs=False)
    assert cfg.source == "<embedded default>"
    assert cfg.sources == ("<embedded default>", str(f))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.tier("disk").path == tmp_path / "state/disk.tier"
    assert [t.name for t in cfg.tiers] == ["ram", "disk"]


def test_check_config_lists_the_files_read(tmp_path: Path) -> None:
    main = write(tmp_path / "t.toml", make(tmp_path))
    f = write(tmp_path / "t.toml.d/10-x.toml", "[device]\npriority = 3\n")
    p = subprocess.run([sys.executable, "-m", "tierswap", "check-config", "--config", str(main)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == f"read: {main}, {f}"
