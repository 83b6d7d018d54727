"""cgroup parsing and file layout on fake trees; real groups when root with a memory controller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierswap import cgroup as cgm
from tierswap.cgroup import CgroupError, MemoryCgroup, run_in_cgroup

MiB = 1 << 20

HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/d2317136
3:cpuset:/
2:cpu,cpuacct:/
0::/
"""
PURE_V2 = "0::/user.slice/user-1000.slice/session-2.scope\n"


def test_parse_proc_cgroup() -> None:
    assert cgm.parse_proc_cgroup(HYBRID) == ("v1", "/process_api/d2317136")
    assert cgm.parse_proc_cgroup(PURE_V2) == ("v2", "/user.slice/user-1000.slice/session-2.scope")
    assert cgm.parse_proc_cgroup("5:cpu,memory:/a/b\n0::/\n") == ("v1", "/a/b")
    assert cgm.parse_proc_cgroup("3:cpu:/\n\n1:name=systemd:/x\n") is None
    assert cgm.parse_proc_cgroup("") is None


def test_parse_limit() -> None:
    assert cgm.parse_limit("9223372036854771712\n") is None  # v1 "unlimited"
    assert cgm.parse_limit("max\n") is None
    assert cgm.parse_limit("67108864\n") == 64 * MiB
    assert cgm.parse_limit("0") == 0


def fake_v1(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return root


def fake_v2(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("cpu\n")
    return root


def test_detect(tmp_path: Path) -> None:
    assert cgm.detect(tmp_path / "none", tmp_path / "none") is None
    assert cgm.detect(fake_v1(tmp_path / "memory"), tmp_path) == "v1"
    v2 = fake_v2(tmp_path / "unified")
    assert cgm.detect(tmp_path / "none", v2) == "v2"
    (v2 / "cgroup.controllers").write_text("cpu io\n")
    assert cgm.detect(tmp_path / "none", v2) is None


def test_v1_files_on_fake_tree(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    cg = MemoryCgroup.create("job", 64 * MiB, root=root)
    assert cg.kind == "v1" and cg.path == root / "job"
    assert (cg.path / "memory.limit_in_bytes").read_text() == f"{64 * MiB}\n"
    assert (cg.path / "memory.swappiness").read_text() == "100\n"
    (cg.path / "memory.usage_in_bytes").write_text("1000\n")
    (cg.path / "memory.memsw.usage_in_bytes").write_text("1500\n")
    assert cg.usage_bytes() == 1000 and cg.swap_bytes() == 500
    assert cg.limit_bytes() == 64 * MiB
    (cg.path / "memory.memsw.usage_in_bytes").unlink()
    (cg.path / "memory.stat").write_text("cache 0\nrss 1000\nswap 4096\n")
    assert cg.swap_bytes() == 4096
    (cg.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cg.oom_kills() == 3
    assert cg.pids() == []
    cg.kill_all()  # nothing to kill, and no cgroup.procs file: returns at once

    nosw = MemoryCgroup.create("noswap", 32 * MiB, swap_ok=False, root=root)
    assert (nosw.path / "memory.swappiness").read_text() == "0\n"


def test_v2_files_on_fake_tree(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    cg = MemoryCgroup.create("job", 64 * MiB, root=root)
    assert cg.kind == "v2"
    assert (root / "cgroup.subtree_control").read_text() == "+memory\n"
    assert (cg.path / "memory.max").read_text() == f"{64 * MiB}\n"
    assert (cg.path / "memory.swap.max").read_text() == "max\n"
    (cg.path / "memory.current").write_text("123\n")
    (cg.path / "memory.swap.current").write_text("456\n")
    (cg.path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert (cg.usage_bytes(), cg.swap_bytes(), cg.oom_kills()) == (123, 456, 1)
    (cg.path / "memory.max").write_text("max\n")
    assert cg.limit_bytes() is None
    (cg.path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    with pytest.raises(CgroupError, match="contains this process"):
        cg.kill_all()
    assert MemoryCgroup.create("n", MiB, swap_ok=False, root=root).path.joinpath(
        "memory.swap.max"
    ).read_text() == "0\n"


def test_create_errors(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no memory cgroup controller"):
        MemoryCgroup.create("x", MiB, root=tmp_path)
    root = fake_v1(tmp_path / "m")
    for name in ("a/b", "", ".."):
        with pytest.raises(CgroupError, match="bad cgroup name"):
            MemoryCgroup.create(name, MiB, root=root)
    with pytest.raises(CgroupError, match="limit"):
        MemoryCgroup.create("x", 0, root=root)
    with pytest.raises(TypeError):
        run_in_cgroup(MemoryCgroup(root, "v1"), "echo hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_own_headroom_walks_up(tmp_path: Path, kind: str) -> None:
    """This process's real cgroup path, mirrored into a fake tree of either hierarchy.

    The process's /proc/self/cgroup is rewritten into the other hierarchy's form in a fake
    /proc, so both kinds run on every host (this one has only one of them).
    """
    parsed = cgm.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    rel = parsed[1] if parsed else "/"
    root = fake_v1(tmp_path) if kind == "v1" else fake_v2(tmp_path)
    limit_f, usage_f = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
        if kind == "v1" else ("memory.max", "memory.current")
    )
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(
        f"7:memory:{rel}\n0::/elsewhere\n" if kind == "v1" else f"0::{rel}\n")
    kw = {"v1_root": root, "v2_root": tmp_path / "none"} if kind == "v1" else {
        "v1_root": tmp_path / "none", "v2_root": root}
    kw_all = {**kw, "proc_root": proc}
    group = root / rel.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    (group / limit_f).write_text("max\n" if kind == "v2" else "9223372036854771712\n")
    (group / usage_f).write_text(f"{10 * MiB}\n")
    assert cgm.own_headroom_bytes(**kw_all) is None
    (group / limit_f).write_text(f"{100 * MiB}\n")
    assert cgm.own_headroom_bytes(**kw_all) == 90 * MiB
    if group != root:  # a tighter ancestor wins
        (root / limit_f).write_text(f"{50 * MiB}\n")
        (root / usage_f).write_text(f"{45 * MiB}\n")
        assert cgm.own_headroom_bytes(**kw_all) == 5 * MiB
    (group / usage_f).write_text(f"{200 * MiB}\n")
    assert cgm.own_headroom_bytes(**kw_all) == 0


needs_root_cgroup = pytest.mark.skipif(
    os.geteuid() != 0 or cgm.detect() is None, reason="needs root and a memory cgroup controller"
)

TOUCH_32M = (
    "import sys; from tierswap.cgroup import own_headroom_bytes as h;"
    "b = b'\\x01' * (32 << 20); print(h(), flush=True); sys.stdin.read()"
)
REPO = Path(__file__).resolve().parents[2]


def _name(tag: str) -> str:
    return f"tierswap-test-{os.getpid()}-{tag}"


@pytest.mark.integration
@needs_root_cgroup
def test_real_group_usage_and_removal() -> None:
    with MemoryCgroup.create(_name("usage"), 64 * MiB) as cg:
        assert cg.limit_bytes() == 64 * MiB
        with run_in_cgroup(
            cg, [sys.executable, "-c", TOUCH_32M], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as proc:
            headroom = int(proc.stdout.readline())  # type: ignore[union-attr]
            assert proc.pid in cg.pids()
            assert cg.usage_bytes() >= 32 * MiB
            assert 0 <= headroom <= 32 * MiB
            assert cg.swap_bytes() >= 0
            cg.kill_all()
        assert proc.returncode == -9
        path = cg.path
    assert not path.exists()


@pytest.mark.integration
@needs_root_cgroup
def test_real_group_removed_when_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), MemoryCgroup.create(
        _name("raise"), 64 * MiB
    ) as cg:
        proc = run_in_cgroup(
            cg, [sys.executable, "-c", TOUCH_32M], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        proc.stdout.readline()  # type: ignore[union-attr]
        raise RuntimeError("boom")
    assert not cg.path.exists()
    with proc:
        assert proc.wait(10) == -9
    cg.remove()  # already gone: fine


@pytest.mark.integration
@needs_root_cgroup
def test_real_group_oom_kill_counted() -> None:
    with MemoryCgroup.create(_name("oom"), 64 * MiB, swap_ok=False) as cg:
        with run_in_cgroup(
            cg, [sys.executable, "-c", "b = b'\\x01' * (256 << 20)"], stderr=subprocess.DEVNULL
        ) as proc:
            assert proc.wait(60) == -9
        assert cg.oom_kills() >= 1
