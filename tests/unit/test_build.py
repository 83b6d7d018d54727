"""`tierswap --version` and the refusal to start without the patched pyfuse3 (tierswap/build.py).

The refusal tests take `Operations.fallocate` away from the imported pyfuse3 with monkeypatch:
what they test is our check and that `up` stops at it, not pyfuse3. The other direction (the
build that .ci/setup installs is the patched one) runs without any patching.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pyfuse3
import pytest

from tests.unit.test_cli_errors import fuse_mounts, good_config, loop_devices
from tierswap import build, cli


def test_version_prints_tierswap_and_the_pyfuse3_build() -> None:
    p = subprocess.run([sys.executable, "-m", "tierswap", "--version"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"tierswap {metadata.version('tierswap')}"
    assert lines[1].startswith(f"pyfuse3 {metadata.version('pyfuse3')} (")
    assert len(lines) == 2


def test_the_installed_pyfuse3_is_the_patched_build() -> None:
    """What .ci/setup and .ci/install install: the version label names our patches."""
    assert hasattr(pyfuse3.Operations, "fallocate")
    assert re.fullmatch(r"3\.5\.0\+tierswap\.p[0-9a-f]{10}", metadata.version("pyfuse3"))
    assert build.pyfuse3_build().describe().endswith("(patched: Operations.fallocate)")
    build.require_patched_pyfuse3()  # does not raise


@pytest.fixture
def unpatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyfuse3 as PyPI ships it: Operations without fallocate."""
    if hasattr(pyfuse3.Operations, "fallocate"):
        monkeypatch.delattr(pyfuse3.Operations, "fallocate")


def test_version_names_an_unpatched_build(unpatched: None, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"pyfuse3 {metadata.version('pyfuse3')} (NOT patched: no Operations.fallocate)"


@pytest.mark.parametrize("foreground", [False, True])
def test_up_refuses_an_unpatched_pyfuse3_in_one_line_and_starts_nothing(
        unpatched: None, tmp_path: Path, foreground: bool, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tierswap.toml"
    cfg.write_text(good_config(tmp_path))
    # Should the check ever be skipped, `up` stops at its root check instead of starting a
    # real instance outside the machine lock (and the test fails on the message).
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = ["up", "--config", str(cfg)] + (["--foreground"] if foreground else [])
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("tierswap: error: pyfuse3 ")
    assert "NOT patched" in lines[0] and ".ci/install" in lines[0]
    assert "pyfuse3-fallocate.md" in lines[0]
    # nothing half-started: no run or state directory, no tier file, no mount, no loop device
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tierswap.toml"]
    assert fuse_mounts(tmp_path) == [] and loop_devices(tmp_path) == []


def test_foreground_up_tells_the_ready_pipe_why(unpatched: None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A detached `up` waits on this pipe for its child's one line."""
    cfg = tmp_path / "tierswap.toml"
    cfg.write_text(good_config(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as above: never a real start
    r, w = os.pipe()
    monkeypatch.setenv("TIERSWAP_READY_FD", str(w))
    try:
        assert cli.main(["up", "--foreground", "--config", str(cfg)]) == 1
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        line = f.read()
    assert line.startswith("ERROR pyfuse3 ") and "NOT patched" in line
    assert line.count("\n") == 1


def test_pyfuse3_that_does_not_import_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # import raises ImportError
    b = build.pyfuse3_build()
    assert b.version is None and not b.patched
    assert b.describe().startswith("pyfuse3 not importable (ModuleNotFoundError")
    with pytest.raises(build.StartError, match=r"^pyfuse3 not importable .*\.ci/install"):
        build.require_patched_pyfuse3()
