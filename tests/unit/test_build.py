"""`tierswap --version` and `up`'s check of pyfuse3 (tierswap/build.py).

A pyfuse3 that does not import is refused; an unpatched one is not (the native lane answers
FALLOCATE itself). The tests take pyfuse3 or `Operations.fallocate` away with monkeypatch: what
they test is our check and that `up` stops at it, not pyfuse3.
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
    build.require_pyfuse3()  # does not raise


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
    assert out[1].startswith(f"pyfuse3 {metadata.version('pyfuse3')} (not patched: ")


@pytest.fixture
def unimportable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # import raises ImportError


def test_an_unpatched_pyfuse3_is_not_refused(unpatched: None, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tierswap.toml"
    cfg.write_text(good_config(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # stops at the next check, root
    assert cli.main(["up", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "must run as root" in err and "pyfuse3" not in err


@pytest.mark.parametrize("foreground", [False, True])
def test_up_refuses_a_pyfuse3_that_does_not_import_in_one_line_and_starts_nothing(
        unimportable: None, tmp_path: Path, foreground: bool, monkeypatch: pytest.MonkeyPatch,
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
    assert "not importable" in lines[0] and ".ci/install" in lines[0]
    assert "pyfuse3-fallocate.md" in lines[0]
    # nothing half-started: no run or state directory, no tier file, no mount, no loop device
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tierswap.toml"]
    assert fuse_mounts(tmp_path) == [] and loop_devices(tmp_path) == []


def test_foreground_up_tells_the_ready_pipe_why(unimportable: None, tmp_path: Path,
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
    assert line.startswith("ERROR pyfuse3 ") and "not importable" in line
    assert line.count("\n") == 1


def test_pyfuse3_that_does_not_import_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # import raises ImportError
    b = build.pyfuse3_build()
    assert b.version is None and not b.patched
    assert b.describe().startswith("pyfuse3 not importable (ModuleNotFoundError")
    with pytest.raises(build.StartError, match=r"^pyfuse3 not importable .*\.ci/install"):
        build.require_pyfuse3()
