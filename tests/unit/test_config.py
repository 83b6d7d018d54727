"""Configuration: sizes, "auto" derivation, and every rejection naming the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierswap import config as C
from tierswap import tierfiles
from tierswap.config import ConfigError, format_size, load_config, parse_config, parse_size
from tierswap.layout import Layout

GIB = 1 << 30
REAL_FS_FREE = C.fs_free


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictable 16 GiB machine with 400 GiB free everywhere, unless a test says otherwise."""
    monkeypatch.setattr(C, "machine_ram", lambda: 16 * GIB)
    monkeypatch.setattr(C, "fs_free", lambda path: 400 * GIB)


def make(
    tmp: Path,
    *,
    daemon: str = "",
    device: str = 'size = "64M"\nshards = 1',
    tiers: str | None = None,
    extra: str = "",
) -> str:
    if tiers is None:
        tiers = (
            '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "8M"\n\n'
            f'[[tier]]\nname = "disk"\nkind = "file"\npath = "{tmp}/disk.tier"\n'
            'capacity = "16M"\n'
        )
    return (
        f'[daemon]\nstate_dir = "{tmp}/state"\nrun_dir = "{tmp}/run"\n{daemon}\n'
        f"[device]\n{device}\n\n{tiers}\n{extra}\n"
    )


def reject(text: str, *needles: str, check_fs: bool = False) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "t.toml", check_fs=check_fs)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "\n" not in msg, "a config error must print as one line"
    assert msg.startswith("t.toml: "), "a config error names the file"
    return msg.removeprefix("t.toml: ")


# ------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("4096", 4096),
        (4096, 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        ("2GiB", 2 * GIB),
        ("2gb", 2 * GIB),
        (" 3 T ", 3 << 40),
        ("1P", 1 << 50),
        ("0.5K", 512),
    ],
)
def test_parse_size_accepts(text: object, n: int) -> None:
    assert parse_size(text, "k") == n


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "12X", "1.2.3G", "-1M", "M", "1 G B", 1.5, None, True, False, [1], "0", 0, -5],
)
def test_parse_size_rejects_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^tier\[3\]\.capacity: "):
        parse_size(bad, "tier[3].capacity")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1K"),
        (1536, "1.5K"),
        (4 << 20, "4M"),
        ((4 << 20) + (1 << 19), "4.5M"),
        (GIB, "1G"),
        (5 << 40, "5T"),
        (1 << 50, "1024T"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(k=st.integers(1, 1023), unit=st.sampled_from(["K", "M", "G", "T"]))
def test_format_then_parse_round_trip(k: int, unit: str) -> None:
    n = k * C._UNITS[unit.lower()]
    assert format_size(n) == f"{k}{unit}"
    assert parse_size(format_size(n), "x") == n


# ------------------------------------------------------------------------ a good config


def test_good_config(tmp_path: Path) -> None:
    cfg = parse_config(make(tmp_path), "t.toml", check_fs=False)
    assert cfg.size == 64 << 20 and cfg.shards == 1 and cfg.priority == 100
    assert [t.name for t in cfg.tiers] == ["ram", "disk"]
    ram, disk = cfg.tiers
    assert (ram.kind, ram.capacity, ram.path) == ("memory", 8 << 20, None)
    assert (disk.kind, disk.capacity, disk.path) == ("file", 16 << 20, tmp_path / "disk.tier")
    assert str(disk.compression) == "zstd:1"
    assert cfg.state_dir == tmp_path / "state" and cfg.run_dir == tmp_path / "run"
    assert Layout.of(cfg).control_socket == tmp_path / "run" / "control.sock"
    assert cfg.tier("disk") is disk
    with pytest.raises(KeyError):
        cfg.tier("nope")
    assert cfg.source == "t.toml"


def test_capacity_rounded_down_to_whole_mebibytes(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "5.5M"\n'
    cfg = parse_config(make(tmp_path, tiers=tiers), check_fs=False)
    assert cfg.tiers[0].capacity == 5 << 20
    assert cfg.tiers[0].name == "memory"  # the name defaults to the kind


# ------------------------------------------------------------------------ rejections


def test_not_toml(tmp_path: Path) -> None:
    reject("this is [not toml", "t.toml", "not valid TOML")
    reject(make(tmp_path) + "\n[device]\nsize = 1\n", "t.toml", "not valid TOML")  # duplicate table


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = reject(make(tmp_path, extra="[bogus]\nx = 1"), "bogus", "unknown key")
    assert msg.startswith("bogus:")


def test_unknown_key_in_device(tmp_path: Path) -> None:
    msg = reject(make(tmp_path, device='size = "64M"\nsizee = 1'), "device.sizee: unknown key")
    assert msg.startswith("device.sizee")


def test_unknown_key_in_daemon(tmp_path: Path) -> None:
    reject(make(tmp_path, daemon='log = "x"'), "daemon.log: unknown key")


def test_unknown_key_in_tier(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "8M"\npath = "/x"\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].path: unknown key")
    tiers = (
        '[[tier]]\nkind = "memory"\ncapacity = "8M"\n'
        f'[[tier]]\nkind = "file"\ncapacity = "8M"\npath = "{tmp_path}/f"\ncolour = 1\n'
    )
    reject(make(tmp_path, tiers=tiers), "tier[1].colour: unknown key")


@pytest.mark.parametrize("size", ['"12X"', '"lots"', '""', "true", "1.5", '"4M * "'])
def test_bad_device_size(tmp_path: Path, size: str) -> None:
    reject(make(tmp_path, device=f"size = {size}"), "device.size:", "expected a size")


@pytest.mark.parametrize("size", ["0", "-4096", '"0M"', '"-4M"', '"ram - ram"'])
def test_non_positive_device_size(tmp_path: Path, size: str) -> None:
    reject(make(tmp_path, device=f"size = {size}"), "device.size:", "positive")


@pytest.mark.parametrize(
    ("cap", "needle"),
    [('"12X"', "expected a size"), ("0", "positive"), ("-1", "positive"), ('"1M"', "at least 4M")],
)
def test_bad_tier_capacity(tmp_path: Path, cap: str, needle: str) -> None:
    tiers = f'[[tier]]\nkind = "memory"\ncapacity = {cap}\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].capacity:", needle)


def test_missing_capacity(tmp_path: Path) -> None:
    reject(make(tmp_path, tiers='[[tier]]\nkind = "memory"\n'), "tier[0].capacity: missing")


def test_unknown_kind(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "8M"\n[[tier]]\nkind = "tape"\ncapacity="8M"\n'
    reject(make(tmp_path, tiers=tiers), "tier[1].kind:", "'tape'")
    reject(make(tmp_path, tiers='[[tier]]\ncapacity = "8M"\n'), "tier[0].kind:")


def test_file_tier_without_path(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "8M"\n[[tier]]\nkind = "file"\ncapacity="8M"\n'
    reject(make(tmp_path, tiers=tiers), "tier[1].path: missing")


@pytest.mark.parametrize("path", ["disk.tier", "./x/disk.tier", ""])
def test_file_tier_relative_path(tmp_path: Path, path: str) -> None:
    tiers = f'[[tier]]\nkind = "file"\ncapacity = "8M"\npath = "{path}"\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].path:")


def test_relative_daemon_dirs(tmp_path: Path) -> None:
    text = make(tmp_path).replace(f'state_dir = "{tmp_path}/state"', 'state_dir = "state"')
    reject(text, "daemon.state_dir:", "absolute")
    text = make(tmp_path).replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{tmp_path}/state"')
    reject(text, "daemon.run_dir:")


def test_duplicate_tier_names(tmp_path: Path) -> None:
    tiers = (
        '[[tier]]\nname = "fast"\nkind = "memory"\ncapacity = "8M"\n'
        f'[[tier]]\nname = "fast"\nkind = "file"\ncapacity = "8M"\npath = "{tmp_path}/f"\n'
    )
    reject(make(tmp_path, tiers=tiers), "tier:", "duplicate", "'fast'")


def test_two_file_tiers_one_path(tmp_path: Path) -> None:
    tiers = (
        f'[[tier]]\nname = "a"\nkind = "file"\ncapacity = "8M"\npath = "{tmp_path}/f"\n'
        f'[[tier]]\nname = "b"\nkind = "file"\ncapacity = "8M"\npath = "{tmp_path}/f"\n'
    )
    reject(make(tmp_path, tiers=tiers), "tier[1].path:", "also tier[0]'s file")


@pytest.mark.parametrize("name", ["Fast", "1st", "has space", "x" * 33, ""])
def test_bad_tier_name(tmp_path: Path, name: str) -> None:
    tiers = f'[[tier]]\nname = "{name}"\nkind = "memory"\ncapacity = "8M"\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].name:")


def test_no_tier(tmp_path: Path) -> None:
    reject(make(tmp_path, tiers=""), "tier:", "at least one")


def test_file_tier_larger_than_free_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "fs_free", REAL_FS_FREE)
    tiers = f'[[tier]]\nkind = "file"\ncapacity = "100P"\npath = "{tmp_path}/sub/dir/disk.tier"\n'
    text = make(tmp_path, tiers=tiers)
    msg = reject(text, "tier[0].capacity:", "exceeds the free room", check_fs=True)
    assert str(tmp_path / "sub/dir/disk.tier") in msg
    # the same config passes when the file system is not consulted
    assert parse_config(text, check_fs=False).tiers[0].capacity == 100 << 50


def test_file_tier_existing_file_counts_as_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierswap.tiers.file import prepare_file

    path = tmp_path / "disk.tier"
    prepare_file(path, 64 << 20)
    monkeypatch.setattr(C, "fs_free", lambda p: 8 << 20)
    tiers = f'[[tier]]\nkind = "file"\ncapacity = "64M"\npath = "{path}"\n'
    assert parse_config(make(tmp_path, tiers=tiers), check_fs=True).tiers[0].capacity == 64 << 20
    tiers = tiers.replace('"64M"', '"80M"')
    reject(make(tmp_path, tiers=tiers), "tier[0].capacity:", check_fs=True)


@pytest.mark.parametrize(
    ("device", "unit"),
    [
        ('size = "1000000"\nshards = 1', "4096"),
        (f'size = {4096 * 64 + 4096}\nshards = 2', "8192"),
        (f'size = {8192 * 64 + 4096 * 4}\nshards = 8', "32768"),
    ],
)
def test_device_size_not_multiple_of_pages_times_shards(
    tmp_path: Path, device: str, unit: str
) -> None:
    reject(make(tmp_path, device=device), "device.size:", "multiple of", unit)


def test_device_too_small(tmp_path: Path) -> None:
    reject(make(tmp_path, device="size = 61440"), "device.size:", "too small")
    parse_config(make(tmp_path, device="size = 65536"), check_fs=False)  # 16 pages is the floor


@pytest.mark.parametrize("shards", ["0", "17", '"many"', "true", "1.5"])
def test_bad_shards(tmp_path: Path, shards: str) -> None:
    reject(make(tmp_path, device=f'size = "64M"\nshards = {shards}'), "device.shards:")


def test_tier_too_small_for_shards(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "4M"\n'
    text = make(tmp_path, device='size = "64M"\nshards = 8', tiers=tiers)
    reject(text, "tier[0].capacity:", "8 shards")


@pytest.mark.parametrize(
    ("comp", "needle"),
    [
        ('"lz5"', "unknown compression"),
        ('"lz4:0"', "acceleration"),
        ('"zstd:fast"', "bad zstd level"),
        ('"zstd:20"', "-7..19"),
        ('"zstd:-8"', "-7..19"),
        ("3", "expected"),
        ('"gzip:1"', "unknown compression"),
    ],
)
def test_bad_compression(tmp_path: Path, comp: str, needle: str) -> None:
    tiers = f'[[tier]]\nkind = "memory"\ncapacity = "8M"\ncompression = {comp}\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].compression:", needle)


@pytest.mark.parametrize(
    ("comp", "text"), [('"none"', "none"), ('"zstd"', "zstd:1"), ('"zstd:-7"', "zstd:-7"),
                       ('"zstd:19"', "zstd:19")],
)
def test_good_compression(tmp_path: Path, comp: str, text: str) -> None:
    tiers = f'[[tier]]\nkind = "memory"\ncapacity = "8M"\ncompression = {comp}\n'
    assert str(parse_config(make(tmp_path, tiers=tiers), check_fs=False).tiers[0].compression) == (
        text
    )


def test_watermark_order(tmp_path: Path) -> None:
    extra = "[policy]\nhigh_watermark = 0.5\nlow_watermark = 0.6\n"
    reject(make(tmp_path, extra=extra), "policy.low_watermark:", "high_watermark")
    extra = "[policy]\nhigh_watermark = 0.6\nlow_watermark = 0.6\n"
    pol = parse_config(make(tmp_path, extra=extra), check_fs=False).policy
    assert pol.high_watermark == pol.low_watermark == 0.6
    # against the default high watermark (0.9) too
    reject(make(tmp_path, extra="[policy]\nlow_watermark = 0.95\n"), "policy.low_watermark:")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("high_watermark = 1.5", "policy.high_watermark"),
        ('rate = "fast"', "policy.rate"),
        ('promote = "yes"', "policy.promote"),
        ("idle_age = -1", "policy.idle_age"),
        ("speed = 1", "policy.speed"),
    ],
)
def test_bad_policy(tmp_path: Path, line: str, key: str) -> None:
    reject(make(tmp_path, extra=f"[policy]\n{line}\n"), f"{key}:")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('listen = "0.0.0.0:9110"', "metrics.listen"),
        ('listen = "127.0.0.1:http"', "metrics.listen"),
        ('textfile = "metrics.prom"', "metrics.textfile"),
        ("interval = 0.5", "metrics.interval"),
        ("port = 1", "metrics.port"),
    ],
)
def test_bad_metrics(tmp_path: Path, line: str, key: str) -> None:
    reject(make(tmp_path, extra=f"[metrics]\n{line}\n"), f"{key}:")


@pytest.mark.parametrize("section", ["device", "daemon", "policy", "metrics"])
def test_section_that_is_not_a_table(tmp_path: Path, section: str) -> None:
    tiers = '[[tier]]\nkind = "memory"\ncapacity = "8M"\n'
    msg = reject(f"{section} = 3\n{tiers}", f"{section}:", "table")
    assert msg.startswith(f"{section}:")


def test_tier_that_is_not_an_array_of_tables(tmp_path: Path) -> None:
    reject('tier = 3\n', "tier:")
    reject('tier = [1]\n', "tier[0]:")


# ------------------------------------------------------------------------ "auto"


def test_auto_sizes_follow_machine_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = (
        '[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "auto"\n'
        f'[[tier]]\nname = "disk"\nkind = "file"\ncapacity = "auto"\npath = "{tmp_path}/d"\n'
    )
    text = make(tmp_path, device='size = "auto"\nshards = 2', tiers=tiers)

    monkeypatch.setattr(C, "machine_ram", lambda: 8 * GIB + 12345)
    cfg = parse_config(text, check_fs=False)
    assert cfg.size == 8 * GIB + 8192  # rounded down to 4 KiB x 2 shards
    assert cfg.tier("ram").capacity == 2 * GIB  # RAM / 4
    assert cfg.tier("disk").capacity == 4 * GIB  # min(RAM / 2, 8G, free / 4 = 100G)

    monkeypatch.setattr(C, "machine_ram", lambda: 64 * GIB)
    monkeypatch.setattr(C, "fs_free", lambda p: 20 * GIB + 3)
    cfg = parse_config(text, check_fs=False)
    assert cfg.size == 64 * GIB
    assert cfg.tier("ram").capacity == 4 * GIB  # capped at 4G
    assert cfg.tier("disk").capacity == 5 * GIB  # a quarter of the free room, whole MiB
    monkeypatch.setattr(C, "fs_free", lambda p: 400 * GIB)
    assert parse_config(text, check_fs=False).tier("disk").capacity == 8 * GIB  # at most 8G


def test_auto_not_for_remote(tmp_path: Path) -> None:
    tiers = '[[tier]]\nkind = "remote"\ncapacity = "auto"\ntargets = ["nbd://h/x"]\n'
    reject(make(tmp_path, tiers=tiers), "tier[0].capacity:", "remote")


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(C, "machine_ram", lambda: 8 * GIB)
    monkeypatch.setattr(tierfiles, "existing_tier_file", lambda p: (None, 0))  # not this machine's
    cfg = load_config(check_fs=False)
    assert cfg.source == "<embedded default>"
    assert cfg.size == 8 * GIB
    assert 1 <= cfg.shards <= 4
    assert [(t.name, t.kind) for t in cfg.tiers] == [("ram", "memory"), ("disk", "file")]
    assert cfg.tier("ram").capacity == 2 * GIB
    assert cfg.tier("disk").capacity == 4 * GIB  # RAM / 2: conservative
    assert cfg.run_dir == Path("/run/tierswap")
    # the embedded text is the packaged default.toml
    assert C.default_config_text() == (Path(C.__file__).parent / "default.toml").read_text()


def test_default_path_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tierswap.toml"
    path.write_text(make(tmp_path))
    monkeypatch.setattr(C, "DEFAULT_CONFIG_PATH", path)
    cfg = load_config(check_fs=False)
    assert cfg.source == str(path) and cfg.size == 64 << 20


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)
    bad.write_text("[device\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid TOML"):
        load_config(bad)


def _remote(extra: str, n: int = 6) -> str:
    urls = ", ".join(f'"nbd://h{i}/x"' for i in range(n))
    return f'[[tier]]\nkind = "remote"\ncapacity = "64M"\ntargets = [{urls}]\n{extra}'


def test_remote_erasure_and_repair_rate(tmp_path: Path) -> None:
    cfg = parse_config(make(tmp_path, tiers=_remote('erasure = " 4 + 2 "\nrepair_rate = "16M"\n')),
                       check_fs=False)
    t = cfg.tiers[0]
    assert t.erasure == (4, 2) and t.replicas == 1 and t.repair_rate == 16 << 20
    assert parse_config(make(tmp_path, tiers=_remote("replicas = 2\n")),
                        check_fs=False).tiers[0].erasure is None
    assert parse_config(make(tmp_path, tiers=_remote("")), check_fs=False).tiers[0] \
        .repair_rate == 64 << 20
    reject(make(tmp_path, tiers=_remote('erasure = "4+2"\nreplicas = 2\n')),
           "tier[0].erasure:", "exclusive with replicas")
    reject(make(tmp_path, tiers=_remote('erasure = "4+3"\n')), "tier[0].erasure:", "7 targets")
    for bad in ('"4"', '"4+0"', '"0+2"', "6", '"a+b"', '"65+1"'):
        reject(make(tmp_path, tiers=_remote(f"erasure = {bad}\n", n=70)), "tier[0].erasure:")
    reject(make(tmp_path, tiers=_remote('repair_rate = "fast"\n')), "tier[0].repair_rate:")
    reject(make(tmp_path, tiers='[[tier]]\nkind = "memory"\ncapacity = "8M"\nerasure = "1+1"\n'),
           "tier[0].erasure: unknown key")
