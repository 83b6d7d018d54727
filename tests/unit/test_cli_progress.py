"""The migrate/drain progress bar on a terminal, including the indeterminate start
(total=None, which rich < 12.3 cannot render: the floor in pyproject.toml)."""

from __future__ import annotations

import argparse
import sys

from tierswap import cli, commands


def test_progress_bar_with_and_without_a_total(monkeypatch, capsys):
    def fake_request(args, req, timeout=None, on_progress=None):
        assert on_progress is not None
        on_progress({"pages": 0, "total": None})
        on_progress({"pages": 5, "total": None})
        on_progress({"pages": 7, "total": 10})
        return {"pages": 10, "bytes": 40960}

    monkeypatch.setattr(cli, "_request", fake_request)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert cli._run_move(argparse.Namespace(), commands.Drain(tier="ram")) == 0
    assert "moved 10 pages" in capsys.readouterr().out
