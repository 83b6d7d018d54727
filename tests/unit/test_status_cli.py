"""`tierswap status` through the whole chain (cli -> real supervisor -> real shards on real
control sockets, as in test_control_plane), the status summary file for users who are not
root or a supervisor that does not answer, and `tierswap up`'s plan.

Only the loop devices and /proc/swaps are stand-ins (the shards' devices are never attached
here); the 2 s unresponsive path uses a real socket that accepts and never answers, and
asserts that status comes back and says so, not how fast.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.unit.test_control_plane import cluster, make_config, run_cli, silent_shard
from tierswap import cli, summary, system
from tierswap.config import parse_config
from tierswap.layout import Layout
from tierswap.plan import plan_lines, same_priority_swaps
from tierswap.procs import ProcessId

MiB = 1 << 20
SHARE = 512 * 4096  # test_control_plane.make_config: NPAGES pages per shard


@pytest.fixture(autouse=True)
def swaps(monkeypatch):
    """/proc/swaps as the kernel would show the cluster's devices (only /dev/loop90 in)."""
    table = {"/dev/loop90": {"type": "partition", "size": SHARE - 4096, "used": 8192,
                             "priority": 100},
             "/dev/zram0": {"type": "partition", "size": 1 << 30, "used": 0, "priority": 100}}
    monkeypatch.setattr(system, "active_swaps", lambda: dict(table))
    return table


async def test_bytes_raw_noheadings_output(tmp_path, nursery, capsys):
    async with cluster(tmp_path, nursery):
        conf = str(tmp_path / "tierswap.toml")
        assert await run_cli("status", "--bytes", "--raw", "--noheadings", "--output",
                             "NAME,SIZE,USED", "--config", conf) == 0
        out = capsys.readouterr().out.splitlines()
        assert [ln.split(" ") for ln in out] == [["/dev/loop90", str(SHARE), "8192"],
                                                 ["/dev/loop91", str(SHARE), "-"]]
        # the tierswap columns: each row its own shard's pages (64 written to each)
        assert await run_cli("status", "--raw", "--output", "name,state,pages,zero-pages",
                             "--config", conf) == 0
        rows = [ln.split(" ") for ln in capsys.readouterr().out.splitlines()]
        assert rows[0] == ["NAME", "STATE", "PAGES", "ZERO-PAGES"]
        assert [r[:2] for r in rows[1:]] == [["/dev/loop90", "serving"],
                                             ["/dev/loop91", "serving"]]
        assert all(int(r[2]) + int(r[3]) == 64 for r in rows[1:])
        # the default view and --json are still there
        assert await run_cli("status", "--config", conf) == 0
        assert "TIER" in capsys.readouterr().out
        assert await run_cli("status", "--json", "--config", conf) == 0
        st = json.loads(capsys.readouterr().out)
        assert [s["index"] for s in st["shards"]] == [0, 1]


async def test_unknown_column_is_one_usage_line(tmp_path, nursery, capsys):
    async with cluster(tmp_path, nursery):
        conf = str(tmp_path / "tierswap.toml")
        assert await run_cli("status", "--output", "NAME,BOGUS", "--config", conf) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unknown column 'BOGUS'" in err[0] and "NAME" in err[0]


async def test_a_shard_that_does_not_answer_is_shown_unresponsive(tmp_path, nursery, capsys):
    """The real 2 s shard timeout (commands.STATUS_SHARD_TIMEOUT), not a patched one."""
    async with cluster(tmp_path, nursery, broken=(1,)) as sup:
        await nursery.start(silent_shard, sup.slots[1].paths.control_socket)
        conf = str(tmp_path / "tierswap.toml")
        with trio.fail_after(30):  # a guard against a hang, far above the contract
            code = await run_cli("status", "--bytes", "--raw", "--noheadings", "--output",
                                 "NAME,STATE,USED,PRIO,PAGES", "--config", conf)
        assert code == 0
        rows = [ln.split(" ") for ln in capsys.readouterr().out.splitlines()]
        assert rows[0][:2] == ["/dev/loop90", "serving"] and rows[0][4] != "-"
        assert rows[1] == ["/dev/loop91", "unresponsive", "-", "-", "-"]


def _write_summary(cfg, ident: ProcessId) -> Path:
    st = {"size_bytes": 2 * SHARE, "priority": 100, "devices": ["/dev/loop90"],
          "shards": [{"index": 0, "pid": 1234, "device": "/dev/loop90", "state": "serving",
                      "restarts": 0, "reporting": True, "stored_pages": 5, "zero_pages": 1,
                      "stored_bytes": 4096, "metadata_bytes": 0, "size_bytes": SHARE,
                      "swap": None}],
          "pages": {"stored": 5, "zero": 1}, "tiers": []}
    path = Layout.of(cfg).summary_file
    assert summary.write(path, st, ident)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="a summary is believed only when root's")
def test_summary_when_the_supervisor_does_not_answer(tmp_path, monkeypatch, capsys):
    cfg = make_config(tmp_path)
    lay = Layout.of(cfg)
    lay.run_dir.mkdir(mode=0o700)
    import socket

    with socket.socket(socket.AF_UNIX) as s:  # a supervisor that accepts, never answers
        s.bind(str(lay.control_socket))
        s.listen(1)
        monkeypatch.setattr(cli, "STATUS_TIMEOUT", 0.3)
        conf = str(tmp_path / "tierswap.toml")
        # no summary: the one line of the failure
        assert cli.main(["status", "--config", conf]) == 1
        assert "did not answer" in capsys.readouterr().err
        path = _write_summary(cfg, ProcessId.of_self())
        assert path.parent == lay.run_dir.parent  # next to the 0700 run dir, not in it
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert cli.main(["status", "--bytes", "--raw", "--noheadings", "--output",
                         "NAME,USED,PAGES", "--config", conf]) == 0
        out, err = capsys.readouterr()
        # USED is what /proc/swaps says now, not what the summary recorded
        assert out.split() == ["/dev/loop90", "8192", "5"]
        assert "summary written" in err and str(path) in err
        assert cli.main(["status", "--json", "--config", conf]) == 0
        assert json.loads(capsys.readouterr().out)["summary"]["file"] == str(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="a summary is believed only when root's")
def test_a_stale_or_foreign_summary_is_never_shown(tmp_path):
    cfg = make_config(tmp_path)
    lay = Layout.of(cfg)
    # written by a supervisor that is gone (a process that exited: its start time is gone)
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    gone = ProcessId(int(p.stdout), 12345)
    _write_summary(cfg, gone)
    with pytest.raises(summary.SummaryError, match="not running"):
        summary.read(lay.summary_file)
    # one that anyone could have written is not believed
    _write_summary(cfg, ProcessId.of_self())
    assert summary.read(lay.summary_file)[0]["pages"]["stored"] == 5
    os.chown(lay.summary_file, 65534, 65534)
    with pytest.raises(summary.SummaryError, match="not root's"):
        summary.read(lay.summary_file)
    os.chown(lay.summary_file, 0, 0)
    os.chmod(lay.summary_file, 0o666)
    with pytest.raises(summary.SummaryError, match="not root's"):
        summary.read(lay.summary_file)
    lay.summary_file.unlink()
    lay.summary_file.symlink_to(tmp_path / "tierswap.toml")
    with pytest.raises(summary.SummaryError):
        summary.read(lay.summary_file)


def test_summary_write_does_not_follow_a_planted_link(tmp_path, caplog):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "run.status.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.symlink_to(victim)  # removed as our own leftover, never written through
    old = os.umask(0o077)
    try:
        assert summary.write(path, {"pages": {}}, ProcessId.of_self())
    finally:
        os.umask(old)
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.status.json", "victim"]
    assert not summary.write(tmp_path / "no-dir" / "x.json", {}, ProcessId.of_self())
    assert any("summary not written" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- up's plan


def _cfg(tmp_path: Path, extra: str = ""):
    text = f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "1G"
priority = 100
shards = 2
[[tier]]
name = "ram"
kind = "memory"
capacity = "64M"
[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.tier"
capacity = "512M"
compression = "zstd:3"
{extra}"""
    (tmp_path / "tierswap.toml").write_text(text)
    return parse_config(text, source=str(tmp_path / "tierswap.toml"), check_fs=False)


def test_plan_names_the_size_and_each_tier_with_its_size_and_file(tmp_path):
    lines = plan_lines(_cfg(tmp_path))
    assert lines[0].startswith("plan: 1G virtual swap (1073741824 bytes) in 2 device(s) of "
                               "512M, priority 100")
    assert lines[1] == "  tier ram (memory): 64M, zstd:1, in locked RAM, taken as pages arrive"
    assert lines[2] == f"  tier disk (file): 512M, zstd:3, in {tmp_path}/disk.tier (new file)"
    (tmp_path / "disk.tier").write_bytes(b"x" * 4096)
    assert plan_lines(_cfg(tmp_path))[2].endswith("(existing file, 4K)")


def test_another_swap_at_the_same_priority_is_warned_of(tmp_path, swaps):
    cfg = _cfg(tmp_path)
    warn = same_priority_swaps(cfg, swaps, ours={"/dev/loop90"})
    assert len(warn) == 1 and warn[0].startswith("warning: /dev/zram0 (zram) is active at "
                                                 "priority 100")
    swaps["/swapfile"] = {"type": "file", "size": 1, "used": 0, "priority": 100}
    swaps["/dev/sda2"] = {"type": "partition", "size": 1, "used": 0, "priority": -2}
    warn = same_priority_swaps(cfg, swaps, ours={"/dev/loop90"})
    assert [w.split()[1:3] for w in warn] == [["/dev/zram0", "(zram)"], ["/swapfile", "(file)"]]


def test_up_prints_its_plan_before_it_allocates_anything(tmp_path, monkeypatch, capsys, swaps):
    """The plan and the warnings are on stderr (stdout stays the device list) before the
    first thing `up` creates, here the run directory (stopped right there)."""
    if os.geteuid() != 0:
        pytest.skip("up refuses before the plan when not root")
    _cfg(tmp_path, '[metrics]\nlisten = "127.0.0.1:9110"\n')
    del swaps["/dev/loop90"]  # only zram0 is active, at the priority of the config

    def stop_here(d):
        raise OSError(f"stopped before creating {d}")

    monkeypatch.setattr(cli, "make_private_dir", stop_here)
    assert cli.main(["up", "--config", str(tmp_path / "tierswap.toml")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("tierswap: plan: 1G virtual swap")
    assert lines[1].startswith("tierswap:   tier ram (memory): 64M")
    assert lines[2].startswith(f"tierswap:   tier disk (file): 512M, zstd:3, in {tmp_path}")
    assert lines[3].startswith("tierswap: warning: /dev/zram0 (zram) is active at priority")
    # the removed key: one line that says so, and the start goes on
    assert lines[4].startswith("tierswap: warning: metrics.listen is no longer supported")
    assert lines[5].startswith("tierswap: error: stopped before creating")
    assert not (tmp_path / "disk.tier").exists() and not (tmp_path / "run").exists()
