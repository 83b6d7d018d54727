"""The man pages and the bash completion that .ci/install installs (docs/man/).

tierswap(8) and the completion are generated from the command's parser (docs/man/build.py), so
the tests check that they render cleanly, name every subcommand and option, and that bash
really completes with the generated script. tierswap.toml(5) is written by hand: it must render
without warnings and name every section of the configuration.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

from tierswap.cli import build_parser

pytest.importorskip("argparse_manpage", reason="the [man] extra is not installed")
pytest.importorskip("shtab", reason="the [man] extra is not installed")

ROOT = Path(__file__).parents[2]
MAN = ROOT / "docs" / "man"
needs_man = pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    build = runpy.run_path(str(MAN / "build.py"))  # as .ci/install runs it, not as a module
    assert build["main"]([str(out)]) == 0
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def render(page: Path) -> tuple[str, str]:
    """(text, warnings) as man shows it; --warnings reports every roff problem."""
    env = dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8")
    p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return re.sub(".\b", "", p.stdout), p.stderr  # without the overstrike of bold text


@needs_man
def test_tierswap_8_renders_cleanly_and_names_every_command_and_option(built: Path) -> None:
    text, warnings = render(built / "tierswap.8")
    assert warnings == ""
    assert text.startswith("TIERSWAP(8)")
    for name, sub in subcommands().items():
        assert f"tierswap {name}" in text
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and action.help != argparse.SUPPRESS:
                    assert opt in text, (name, opt)
    assert "--version" in text
    for section in ("EXIT STATUS", "FILES", "SEE ALSO"):
        assert f"\n{section}\n" in text
    assert "tierswap.toml(5)" in text


@needs_man
def test_tierswap_toml_5_renders_cleanly_and_names_every_section() -> None:
    text, warnings = render(MAN / "tierswap.toml.5")
    assert warnings == ""
    assert text.startswith("TIERSWAP.TOML(5)")
    for section in ("[daemon]", "[device]", "[[tier]]", "[policy]", "[metrics]"):
        assert section in text
    # the example's active keys are all named
    for line in (ROOT / "systemd" / "tierswap.toml.example").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            assert line.split("=")[0].strip() in text, line


@needs_man
def test_man_finds_an_installed_gzipped_page(built: Path, tmp_path: Path) -> None:
    """What `man -w tierswap` does after .ci/install, on a man tree of our own."""
    (tmp_path / "man8").mkdir()
    with gzip.open(tmp_path / "man8" / "tierswap.8.gz", "wb") as f:
        f.write((built / "tierswap.8").read_bytes())
    p = subprocess.run(["man", "-M", str(tmp_path), "-w", "tierswap"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == str(tmp_path / "man8" / "tierswap.8.gz")


def complete(script: Path, line: str) -> list[str]:
    """Run bash's completion for `line` (the cursor at its end) with the generated script."""
    words = line.split(" ")
    bash = f"""
source {script}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}
COMP_POINT={len(line)}
_shtab_tierswap tierswap {words[-1]!r} {words[-2]!r}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", bash], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_commands_and_options(built: Path) -> None:
    script = built / "tierswap.bash"
    assert subprocess.run(["bash", "-n", str(script)], timeout=60).returncode == 0
    assert set(complete(script, "tierswap ")) >= set(subcommands())
    assert complete(script, "tierswap che") == ["check-config"]
    assert "--json" in complete(script, "tierswap status --")
    assert "--force" in complete(script, "tierswap down --")
