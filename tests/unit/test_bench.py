"""`tierswap bench` without root: arguments, refusals, the ratio table, the output files, and
that every exit path (a failing step, Ctrl-C, SIGTERM) tears down what was set up.

The backends here are stand-ins (no swap device: the machine part is
tests/integration/test_bench.py); the workload is the real one, run unconfined and small.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tierswap import bench, cli
from tierswap.config import load_config


class FakeCgroup:
    removed = 0

    def __init__(self) -> None:
        self.path = Path("/nonexistent")

    def usage_bytes(self) -> int:
        return 0

    def swap_bytes(self) -> int:
        return 0

    def oom_kills(self) -> int:
        return 0

    def remove(self) -> None:
        FakeCgroup.removed += 1


class FakeBackend:
    """A backend with no device; `fail_in` names a step that raises `exc`."""

    def __init__(self, name: str, fail_in: str | None = None,
                 exc: BaseException | None = None) -> None:
        self.name = name
        self.label = name
        self.fail_in = fail_in
        self.exc = exc
        self.calls: list[str] = []

    def _step(self, step: str) -> None:
        self.calls.append(step)
        if step == self.fail_in:
            if self.exc is None:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once
            else:
                raise self.exc

    def setup(self) -> None:
        self._step("setup")

    def devices(self) -> list[str]:
        return []

    def snapshot(self) -> dict[str, Any]:
        self._step("snapshot")
        return {"compression": 2.0 if self.name == "zram" else 3.0}

    def teardown(self) -> list[str]:
        self.calls.append("teardown")
        return []


@pytest.fixture
def machine(monkeypatch):
    """Root, no other swap, plenty of memory, a small minimum size, stand-in cgroups."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench, "other_swaps", lambda: [])
    monkeypatch.setattr(bench, "mem_available", lambda: 64 << 30)
    monkeypatch.setattr(bench, "MIN_SIZE", 1 << 20)
    monkeypatch.setattr(bench, "LAT_SAMPLES", 10)
    monkeypatch.setattr(bench.MemoryCgroup, "create", lambda name, limit: FakeCgroup())
    monkeypatch.setattr(bench, "run_in_cgroup",
                        lambda cg, argv, **kw: __import__("subprocess").Popen(argv, **kw))
    monkeypatch.setattr(bench, "probe_overhead", lambda: 1.0)
    FakeCgroup.removed = 0
    made: list[FakeBackend] = []

    def use(*backends: FakeBackend, skipped: str | None = None) -> list[FakeBackend]:
        made[:] = backends
        monkeypatch.setattr(bench, "default_backends", lambda size: (list(backends), skipped))
        return made

    return use


def run_cli(*argv: str) -> int:
    return cli.main(["bench", *argv])


# ---------------------------------------------------------------------------- arguments


def test_defaults_and_force_alias():
    a = cli.build_parser().parse_args(["bench"])
    assert (a.size, a.out, a.yes) == ("1G", None, False)
    assert cli.build_parser().parse_args(["bench", "--force"]).yes
    assert cli.build_parser().parse_args(["bench", "--yes"]).yes


@pytest.mark.parametrize("argv, word", [
    (["--size", "12X"], "--size"),
    (["--size", "1M"], "at least 64M"),
    (["--size", "100000"], "multiple of 4 KiB"),
    (["--frobnicate"], "unrecognized"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, word, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(bench, "preflight", lambda *a: called.append(a))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert word in err and len(err.strip().splitlines()) == 1
    assert not called  # refused before looking at the machine


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    assert run_cli("--size", "128M", "--out", str(f)) == 2
    assert "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- refusals


def test_refuses_with_another_swap_active_and_starts_nothing(machine, monkeypatch, capsys,
                                                             tmp_path):
    made = machine(FakeBackend("zram"), FakeBackend("tierswap"))
    monkeypatch.setattr(bench, "other_swaps", lambda: ["/swapfile"])
    out = tmp_path / "out"
    assert run_cli("--size", "4M", "--out", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert "/swapfile" in err and "--yes" in err and len(err.splitlines()) == 1
    assert all(not b.calls for b in made) and not out.exists()


def test_yes_runs_with_another_swap_and_records_it(machine, monkeypatch, tmp_path):
    machine(FakeBackend("zram"), FakeBackend("tierswap"))
    monkeypatch.setattr(bench, "other_swaps", lambda: ["/swapfile"])
    assert run_cli("--size", "4M", "--out", str(tmp_path), "--yes") == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["params"]["other_swaps_at_start"] == ["/swapfile"]


def test_refuses_without_root(machine, monkeypatch, capsys):
    machine(FakeBackend("tierswap"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_cli("--size", "4M") == 1
    assert "must run as root" in capsys.readouterr().err


def test_refuses_a_size_the_memory_cannot_hold(machine, monkeypatch, capsys):
    machine(FakeBackend("tierswap"))
    monkeypatch.setattr(bench, "mem_available", lambda: 1 << 20)
    assert run_cli("--size", "4M") == 1
    assert "available memory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a whole run


def test_run_writes_json_table_and_chart(machine, tmp_path, capsys):
    made = machine(FakeBackend("zram"), FakeBackend("tierswap"))
    assert run_cli("--size", "4M", "--out", str(tmp_path / "o")) == 0
    doc = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert set(doc["backends"]) == {"zram", "tierswap"}
    for r in doc["backends"].values():
        assert r["workload"]["ok"] and r["workload"]["bad_pages"] == 0
        assert r["workload"]["pages"] == 1024
    assert doc["ratios"]["compression"] == 1.5
    out = capsys.readouterr().out
    assert "tierswap / zram" in out and "1.50x" in out
    assert all(b.calls == ["setup", "snapshot", "teardown"] for b in made)
    assert FakeCgroup.removed == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart skipped" in out
    else:
        png = tmp_path / "o" / "bench.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_skipped_without_matplotlib(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    doc = _doc(_result(100, 200, 50, 2.0, 10.0), _result(150, 100, 40, 3.0, 20.0))
    lines = bench.write_outputs(doc, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"] == doc["ratios"]
    assert not (tmp_path / "bench.png").exists()
    assert [ln for ln in lines if ln.startswith("chart skipped")] == [
        "chart skipped: matplotlib is not installed (pip install 'tierswap[bench]')"]


def test_failing_backend_is_torn_down_and_the_next_still_runs(machine, tmp_path, capsys):
    made = machine(FakeBackend("zram", "setup", bench.BenchError("no room")),
                   FakeBackend("tierswap"))
    assert run_cli("--size", "4M", "--out", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "zram: no room" in err.strip().splitlines()[-1]
    assert made[0].calls == ["setup", "teardown"]
    assert made[1].calls == ["setup", "snapshot", "teardown"]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["backends"]["zram"]["error"] == "zram: no room"
    assert doc["ratios"]["fill"] is None


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), None], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_pages_are_held_tears_everything_down(machine, tmp_path, capsys,
                                                              monkeypatch, exc):
    started: list[Any] = []
    real = bench.run_in_cgroup

    def spy(cg, argv, **kw):
        p = real(cg, argv, **kw)
        started.append((p, Path(argv[argv.index("--hold-file") + 1])))
        return p

    monkeypatch.setattr(bench, "run_in_cgroup", spy)
    made = machine(FakeBackend("zram", "snapshot", exc), FakeBackend("tierswap"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert run_cli("--size", "4M", "--out", str(tmp_path / "o")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert made[0].calls == ["setup", "snapshot", "teardown"]
    assert made[1].calls == []  # nothing started after the interrupt
    assert FakeCgroup.removed == 1
    wl, hold = started[0]
    assert wl.poll() is not None  # the workload holding its pages was killed
    assert not hold.parent.exists()
    assert {s: signal.getsignal(s) for s in before} == before
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- the table


def _result(fill: float, seq: float, rand: float, compr: float, p50: float,
            ok: bool = True) -> dict[str, Any]:
    return {"label": "x", "compression": compr, "latency": {"p50_us": p50},
            "workload": {"ok": ok, "bad_pages": 0 if ok else 3,
                         "phases": {"fill": {"mb_per_s": fill}, "seq": {"mb_per_s": seq},
                                    "rand": {"mb_per_s": rand}}}}


def _doc(zram: dict[str, Any] | None, ts: dict[str, Any] | None) -> dict[str, Any]:
    backends = {k: v for k, v in (("zram", zram), ("tierswap", ts)) if v is not None}
    doc: dict[str, Any] = {"params": {"size": "1G"}, "host": {"date": "today"},
                           "backends": backends}
    doc["ratios"] = bench.ratios(doc)
    return doc


def test_ratios_are_tierswap_over_zram():
    doc = _doc(_result(100, 200, 50, 2.0, 10.0), _result(150, 100, 40, 3.0, 20.0))
    assert doc["ratios"] == {"fill": 1.5, "seq": 0.5, "rand": 0.8, "compression": 1.5,
                             "p50": 2.0}


def test_table_rows_and_rendering():
    doc = _doc(_result(100, 200, 50, 2.0, 10.0), _result(150, 100, 40, 3.0, 20.0, ok=False))
    rows = bench.table_rows(doc)
    assert rows[0] == ("fill MB/s (swap-out)", "100.0", "150.0", "1.50x")
    assert rows[3] == ("compression (orig / compressed)", "2.00", "3.00", "1.50x")
    assert rows[4] == ("4 KiB read p50 µs (lower is better)", "10.0", "20.0", "2.00x")
    assert rows[5] == ("every page verified", "yes", "NO", "")
    text = bench.render_table(doc)
    for cell in ("fill MB/s", "0.50x", "0.80x", "2.00x", "NO", "tierswap / zram"):
        assert cell in text


def test_table_without_zram_has_no_ratios_and_says_why():
    doc = _doc(None, _result(150, 100, 40, 3.0, 20.0))
    doc["zram_skipped"] = "the kernel has no zram module"
    rows = bench.table_rows(doc)
    assert all(r[3] == "-" for r in rows[:5]) and rows[0][1] == "-" and rows[0][2] == "150.0"
    assert rows[5] == ("every page verified", "-", "yes", "")
    assert "zram skipped: the kernel has no zram module" in bench.render_table(doc)


def test_progress_without_a_terminal_prints_stages(capsys):
    p = bench.Progress(1, tty=False)
    with p.shown():
        for st in bench.Progress.STAGES:
            p.stage("zram", st)
            p.fraction(0.5)
        p.finish_backend()
    assert p.done == p.total
    assert capsys.readouterr().err.splitlines() == [
        f"bench: zram: {st}" for st in bench.Progress.STAGES]


def test_progress_bar_on_a_terminal(capsys):
    p = bench.Progress(2, tty=True)
    with p.shown():
        p.stage("zram", "fill")
        p.fraction(2.0)  # clamped
        p.finish_backend()
    assert p.done == bench.Progress.STAGES["fill"]


# ---------------------------------------------------------------------------- backends


def test_private_tierswap_config_is_its_own(tmp_path):
    t = bench.Tierswap(128 << 20)
    t.base = tmp_path / "inst"
    t.base.mkdir()
    cfg = t.config_path
    cfg.write_text(t.config_text())
    c = load_config(str(cfg))
    assert c.state_dir == t.base / "state" and c.run_dir == t.base / "run"
    assert c.size == 256 << 20 and c.priority == bench.PRIORITY
    assert [x.capacity for x in c.tiers] == [128 << 20, 64 << 20]
    assert all(str(x.path).startswith(str(t.base)) for x in c.tiers if x.kind == "file")


def test_zram_unavailable_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "ZRAM_CONTROL", tmp_path / "none")

    def no_module(argv, **kw):
        raise bench.BenchError("modprobe: FATAL: Module zram not found")

    monkeypatch.setattr(bench, "run_cmd", no_module)
    assert "no zram module" in (bench.Zram.available() or "")
