"""The real install, the way the README says, from a clean clone of the committed HEAD.

`bash .ci/install` runs in a fresh `git clone` of this checkout (so only what is committed is
tested) with TIERSWAP_INSTALL_ROOT pointing at a scratch tree: every path it installs
(/opt/tierswap, /usr/local/sbin/tierswap, the unit, /etc/tierswap, man pages, completion) lands
there instead of in /, and nothing of the host's installation is touched. The patched pyfuse3
wheel is reused rather than built again: TIERSWAP_PYFUSE3_WHEEL if this test run has it set,
else the one .ci/setup built into .wheels/ (if there is none, the install builds it). The other
dependencies come from the package index as on any machine.

Then, as an operator would: `tierswap --version`, `man -w tierswap`, `tierswap status` with no
daemon, bash completion through bash-completion's own loader, and a reinstall that updates
the unit but keeps the operator's configuration. Also here: `.ci/run` refuses to start while
a loop-backed swap device is active (it sets one up, a 16 MiB swap file on a loop device).

Run it under the machine lock, like every integration test: the .ci/run test activates swap.
Limits: apt is asked only for packages that are missing, so on a machine that has them all
nothing is installed from apt; the step itself is exercised on a fresh machine (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import skip_without_capabilities

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 900


def sh(*argv: str | Path, check: bool = True, timeout: float = 120,
       **kw) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: exit {p.returncode}\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a root shell: none of this test run's venv or TIERSWAP_ settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TIERSWAP_", "VIRTUAL_ENV", "PYTHON"))}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = ":".join(p for p in env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":")
                           if p != venv_bin)
    return env | extra


class Installed:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.root = base / "root"
        self.sbin = self.root / "usr/local/sbin/tierswap"
        self.venv = self.root / "opt/tierswap"
        self.unit = self.root / "usr/local/lib/systemd/system/tierswap.service"
        self.conf = self.root / "etc/tierswap"
        self.man = self.root / "usr/local/share/man"

    def install(self) -> subprocess.CompletedProcess[str]:
        env = clean_env(TIERSWAP_INSTALL_ROOT=str(self.root))
        wheel = os.environ.get("TIERSWAP_PYFUSE3_WHEEL")
        wheels = sorted((ROOT / ".wheels").glob("pyfuse3-*+tierswap.*.whl"))
        if wheel or wheels:  # the patched build .ci/setup made; no second build from the sdist
            env["TIERSWAP_PYFUSE3_WHEEL"] = wheel or str(wheels[-1])
        # exactly the README's command, from the top of the clone
        return sh("bash", ".ci/install", cwd=self.src, env=env, timeout=INSTALL_TIMEOUT)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("git", "man"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} (.ci/setup installs it)")
    base = Path(tempfile.mkdtemp(prefix="tierswap-install-", dir="/var/tmp"))
    inst = Installed(base)
    try:
        sh("git", "clone", "-q", ROOT, inst.src)
        p = inst.install()
        assert "install done" in p.stdout, p.stdout
        yield inst
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_version_names_tierswap_and_the_patched_pyfuse3(installed: Installed) -> None:
    assert installed.sbin.is_symlink()
    assert os.readlink(installed.sbin) == str(installed.venv / "bin/tierswap")
    p = sh(installed.sbin, "--version", env=clean_env())
    lines = p.stdout.splitlines()
    with open(installed.src / "pyproject.toml", "rb") as f:
        assert lines[0] == f"tierswap {tomllib.load(f)['project']['version']}"
    assert lines[1].startswith("pyfuse3 3.5.0+tierswap.p")
    assert lines[1].endswith("(patched: Operations.fallocate)")


def test_the_venv_is_a_real_install_without_test_tools(installed: Installed) -> None:
    py = installed.venv / "bin/python"
    probe = ("import importlib.util as u, tierswap, tierswap._lane; print(tierswap.__file__); "
             "print([m for m in ('pytest', 'hypothesis', 'ruff', 'mypy', 'shtab', "
             "'argparse_manpage') if u.find_spec(m)])")
    out = sh(py, "-c", probe, cwd="/", env=clean_env()).stdout.splitlines()
    # not the clone's sources (not editable), and nothing but the runtime
    assert out[0].startswith(str(installed.venv / "lib")), out[0]
    assert out[1] == "[]"
    # the checkout can go: the installation does not refer to it
    assert str(installed.src) not in sh(py, "-m", "pip", "freeze", env=clean_env()).stdout


def test_man_finds_both_pages(installed: Installed) -> None:
    for name, path in (("tierswap", "man8/tierswap.8.gz"),
                       ("tierswap.toml", "man5/tierswap.toml.5.gz")):
        p = sh("man", "-M", installed.man, "-w", name)
        assert p.stdout.strip() == str(installed.man / path)
    text = sh("man", "-M", installed.man, "tierswap", env=clean_env(MANPAGER="cat",
                                                                     MANWIDTH="100")).stdout
    assert "tierswap.toml(5)" in text.replace("\b", "")


def test_status_without_a_daemon_answers_in_one_line(installed: Installed, tmp_path: Path
                                                     ) -> None:
    # the installed example with its run and state directories in tmp_path: this test must not
    # look at (or create) the host's /run/tierswap
    example = (installed.conf / "tierswap.toml.example").read_text()
    cfg = tmp_path / "tierswap.toml"
    cfg.write_text(example.replace('"/run/tierswap"', f'"{tmp_path}/run"')
                   .replace('"/var/lib/tierswap', f'"{tmp_path}/lib'))
    p = sh(installed.sbin, "status", "--config", cfg, check=False, env=clean_env())
    assert "Traceback" not in p.stdout + p.stderr
    assert p.returncode in (0, 1), p.stderr
    if p.returncode:
        assert p.stderr.count("\n") == 1 and "not running" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "lib").exists()


def test_bash_completion_loads_through_bash_completion(installed: Installed) -> None:
    loader = Path("/usr/share/bash-completion/bash_completion")
    if not loader.exists():
        pytest.skip("bash-completion is not installed")
    share = installed.root / "usr/local/share"
    p = sh("bash", "--norc", "--noprofile", "-c",
           f"source {loader}; __load_completion tierswap && complete -p tierswap",
           env=clean_env(XDG_DATA_DIRS=f"{share}:/usr/share"))
    assert "_shtab_tierswap" in p.stdout


def test_unit_runs_the_installed_binary(installed: Installed) -> None:
    text = installed.unit.read_text()
    assert f"ExecStart={installed.sbin} up --foreground" in text
    # every command of the unit runs the installed binary, none the host's
    assert text.count("/usr/local/sbin/tierswap") == text.count(str(installed.sbin)) >= 4


def test_reinstall_updates_ours_and_keeps_the_operators(installed: Installed) -> None:
    conf = installed.conf / "tierswap.toml"
    conf.write_text("# the operator's\n[device]\nsize = \"1G\"\n")
    dropin = installed.root / "etc/systemd/system/tierswap.service.d/local.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nTimeoutStopSec=2h\n")
    good_unit = installed.unit.read_text()
    installed.unit.write_text(good_unit.replace("WatchdogSec=30", "WatchdogSec=99"))  # an old one
    (installed.conf / "tierswap.toml.example").write_text("# stale\n")
    p = installed.install()
    assert "your tierswap.toml is left as it is" in p.stdout
    assert installed.unit.read_text() == good_unit
    assert conf.read_text() == "# the operator's\n[device]\nsize = \"1G\"\n"
    assert dropin.read_text() == "[Service]\nTimeoutStopSec=2h\n"
    example = (installed.conf / "tierswap.toml.example").read_text()
    assert example == (installed.src / "systemd/tierswap.toml.example").read_text()
    assert sh(installed.sbin, "--version", env=clean_env()).returncode == 0
    conf.unlink()


# ------------------------------------------------------------------------------ .ci/run


def active_loop_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [ln.split()[0] for ln in f.readlines()[1:] if ln.startswith("/dev/loop")]


@pytest.fixture
def ci_copy(tmp_path: Path) -> Path:
    """.ci/run as committed, beside a .ci/test that only leaves a mark."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci/run", tmp_path / ".ci/run")
    (tmp_path / ".ci/test").write_text('touch "$(dirname "$0")/../ran"\n')
    return tmp_path


def test_ci_run_refuses_while_a_loop_swap_is_active(ci_copy: Path) -> None:
    skip_without_capabilities()
    base = Path(tempfile.mkdtemp(prefix="tierswap-cirun-", dir="/var/tmp"))
    img = base / "swap.img"
    with open(img, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 << 20)
    dev = sh("losetup", "--find", "--show", img).stdout.strip()
    try:
        sh("mkswap", dev)
        sh("swapon", "--priority", "-2", dev)  # below any real swap: nothing goes there first
        try:
            p = sh("bash", ci_copy / ".ci/run", check=False, env=clean_env())
        finally:
            sh("swapoff", dev)
        assert p.returncode == 1
        assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("ci: refusing to run: loop-backed swap is active")
        assert dev in p.stderr
        assert not (ci_copy / "ran").exists()
    finally:
        sh("losetup", "--detach", dev, check=False)
        shutil.rmtree(base, ignore_errors=True)
    if active_loop_swaps():  # someone else's: the other half cannot be checked now
        pytest.skip(f"loop swap of another user active: {active_loop_swaps()}")
    p = sh("bash", ci_copy / ".ci/run", env=clean_env())
    assert (ci_copy / "ran").exists() and p.stderr == ""
