"""The install scripts' first checks (.ci/install, .ci/setup): Python too old, not root.

The scripts run from a copy of .ci/ in tmp_path (so REPO, and with it the dev venv of
.ci/setup, is the copy) and TIERSWAP_INSTALL_ROOT points into tmp_path: even a script whose
check were gone could not touch the real installation. A stand-in `python3` on PATH reports
3.9, and stand-in `apt-get`/`apt-cache` leave a mark if anything asks apt for a package. The
whole install is tests/integration/test_install.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    for name in ("lib.sh", "install", "setup"):
        shutil.copy(ROOT / ".ci" / name, repo / ".ci" / name)
    shutil.copytree(ROOT / "tierswap" / "contrib", repo / "tierswap" / "contrib")
    return repo


def fake_bin(tmp_path: Path, python_version: str) -> Path:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    mark = tmp_path / "apt-was-called"
    (bin_ / "python3").write_text(f"#!/bin/sh\necho {python_version}\n")
    for tool in ("apt-get", "apt-cache"):
        (bin_ / tool).write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


def run(script: Path, tmp_path: Path, bin_: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSWAP_")}
    env |= {"PATH": f"{bin_}:{env.get('PATH', '/usr/bin:/bin')}",
            "TIERSWAP_INSTALL_ROOT": str(tmp_path / "root")}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian system")
@pytest.mark.parametrize("script", ["install", "setup"])
def test_an_old_python_is_refused_before_any_package_is_installed(
        copy: Path, tmp_path: Path, script: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    p = run(copy / ".ci" / script, tmp_path, fake_bin(tmp_path, "3.9"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr == (f"{script}: error: python3 is 3.9; tierswap needs Python >= 3.11 "
                        "(Debian 12, Ubuntu 23.04 or newer)\n")
    assert not (tmp_path / "apt-was-called").exists()
    assert not (tmp_path / "root").exists() and not (copy / ".venv").exists()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
@pytest.mark.parametrize("script", ["install", "setup"])
def test_not_root_is_refused_in_one_line(script: str) -> None:
    # a copy that user nobody can read (pytest's tmp_path is root's alone)
    repo = Path(tempfile.mkdtemp(prefix="tierswap-scripts-"))
    try:
        (repo / ".ci").mkdir()
        for name in ("lib.sh", script):
            shutil.copy(ROOT / ".ci" / name, repo / ".ci" / name)
        shutil.copytree(ROOT / "tierswap" / "contrib", repo / "tierswap" / "contrib")
        for d in (repo, *repo.rglob("*")):
            d.chmod(0o755)
        argv = ["bash", str(repo / ".ci" / script)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, cwd="/")
    finally:
        shutil.rmtree(repo)
    assert p.returncode == 1
    assert p.stderr == f"{script}: error: must run as root\n"
