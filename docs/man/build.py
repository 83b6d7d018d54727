"""Generate tierswap(8) and the bash completion from the installed command's own parser.

    python docs/man/build.py OUTDIR

writes OUTDIR/tierswap.8 (argparse-manpage, plus the hand-written sections of
tierswap.8.include) and OUTDIR/tierswap.bash (shtab), so that neither can drift from the
options the command really has. .ci/install runs it with the installed venv's interpreter and
the two generators on PYTHONPATH (they are not installed into the venv), then installs the
output; tierswap.toml(5) is written by hand beside this file.

Limits: the generated page lists options as argparse knows them (help texts are the page's
text); anything that needs prose goes into tierswap.8.include.
"""

from __future__ import annotations

import sys
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from tierswap.build import tierswap_version
from tierswap.cli import build_parser

HERE = Path(__file__).resolve().parent


def man_page() -> str:
    parser = build_parser()
    parser.description = None  # the include file's DESCRIPTION says more
    page = Manpage(parser, {
        "description": "a swap device served from user space, in tiers",
        "project_name": "tierswap",
        "version": tierswap_version(),
        "manual_section": 8,
        "manual_title": "System Administration",
        "include": str(HERE / "tierswap.8.include"),
    })
    return str(page)


def completion() -> str:
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        for action in sub._actions:
            if "--config" in action.option_strings:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return shtab.complete(parser, shell="bash")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: build.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tierswap.8").write_text(man_page())
    (out / "tierswap.bash").write_text(completion())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
