"""The workload's content must be reproducible per page and every corruption must be caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierswap import workload as w

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierswap.workload", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    idx=st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
)
def test_pages_independent_of_batch(seed: int, idx: list[int]) -> None:
    together = w.expected_pages(seed, np.array(idx))
    for i, page in zip(idx, together, strict=True):
        assert np.array_equal(w.expected_pages(seed, np.array([i]))[0], page)
    again = w.expected_pages(seed, np.array(idx[::-1]))
    assert np.array_equal(again[::-1], together)


def test_header_and_zero_pages() -> None:
    seed, idx = 12345, np.arange(5000, 9000)
    pages = w.expected_pages(seed, idx)
    kinds = w.page_kinds(seed, idx)
    assert pages.shape == (len(idx), w.PAGE) and pages.dtype == np.uint8
    zero = kinds == w.KINDS.index("zero")
    assert not pages[zero].any()
    assert pages[~zero].any(axis=1).all()
    hdr = pages[~zero, :16].copy().view("<u8")
    assert np.array_equal(hdr[:, 0], idx[~zero])
    assert (hdr[:, 1] == seed).all()
    # Another seed gives other content for the same indices.
    other = w.expected_pages(seed + 1, idx)
    assert (other != pages).any(axis=1).mean() > 0.5


def test_proportions_default_and_custom() -> None:
    n = 200_000
    stats = w.content_stats(3, n)
    assert sum(stats.values()) == n
    for kind, pct in w.DEFAULT_MIX.items():
        assert abs(stats[kind] / n - pct / 100) < 0.01, (kind, stats)
    custom = w.content_stats(3, n, w.parse_mix("zero=50,random=50"))
    assert custom["text"] == custom["struct"] == custom["run"] == 0
    assert abs(custom["zero"] / n - 0.5) < 0.01
    # The stats match the pages actually generated.
    small = w.content_stats(9, 3000)
    pages = w.expected_pages(9, np.arange(3000))
    assert small["zero"] == int((~pages.any(axis=1)).sum())


def test_kinds_compress_as_intended() -> None:
    import zstandard as zstd  # a test extra
    cctx = zstd.ZstdCompressor(level=1)
    idx = np.arange(3000)
    pages, kinds = w.expected_pages(7, idx), w.page_kinds(7, idx)
    ratio = {}
    for k, name in enumerate(w.KINDS):
        sel = np.flatnonzero(kinds == k)[:150]
        assert len(sel) > 50
        ratio[name] = np.mean([len(cctx.compress(pages[i].tobytes())) for i in sel]) / w.PAGE
    assert ratio["zero"] < 0.02
    assert ratio["run"] < 0.15
    assert ratio["text"] < 0.6
    assert ratio["struct"] < 0.6
    assert ratio["random"] > 0.99, ratio


def test_verify_detects_flipped_byte_and_misplaced_pages() -> None:
    seed, idx = 5, np.arange(100, 400)
    actual = w.expected_pages(seed, idx).copy()
    assert len(w.verify_pages(seed, idx, actual)) == 0
    actual[17, 2000] ^= 0x01
    assert w.verify_pages(seed, idx, actual).tolist() == [idx[17]]
    nonzero = np.flatnonzero(w.page_kinds(seed, idx) != 0)
    a, b = nonzero[3], nonzero[4]
    actual = w.expected_pages(seed, idx).copy()
    actual[[a, b]] = actual[[b, a]]  # right content, wrong offset: the header catches it
    assert sorted(w.verify_pages(seed, idx, actual).tolist()) == [idx[a], idx[b]]
    actual = w.expected_pages(seed, idx).copy()
    actual[a] = 0  # a page that came back as zeros
    assert w.verify_pages(seed, idx, actual).tolist() == [idx[a]]


def test_parse_size_and_mix() -> None:
    assert w.parse_size("8M") == 8 << 20
    assert w.parse_size("1G") == 1 << 30
    assert w.parse_size("64k") == 64 << 10
    assert w.parse_size("4096") == 4096
    assert w.parse_size("1.5GiB") == 3 << 29
    assert w.parse_mix("zero=1, text=3") == {"zero": 1.0, "text": 3.0}
    for bad in ("3X", "", "-1M", "G"):
        with pytest.raises(w.WorkloadError):
            w.parse_size(bad)
    for bad in ("zero", "zero=x", "foo=1", "zero=0", "zero=-1,text=2"):
        with pytest.raises(w.WorkloadError):
            w.parse_mix(bad)


def test_cli_run_ok() -> None:
    r = run_cli("--size", "8M", "--seed", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["ok"] is True and out["bad_pages"] == 0
    assert out["size_bytes"] == 8 << 20 and out["pages"] == 2048 and out["seed"] == 3
    assert set(out["phases"]) == {"fill", "seq", "rand"}
    assert out["phases"]["seq"]["bad_pages"] == out["phases"]["rand"]["bad_pages"] == 0
    assert out["phases"]["fill"]["mb_per_s"] > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "3X"],
        ["--size", "1000"],
        ["--size", "8M", "--mix", "foo=1"],
        ["--size", "8M", "--phases", "seq"],
        ["--size", "8M", "--phases", "fill,bogus"],
        ["--size", "8M", "--seed", "abc"],
        ["--seed", "1"],
    ],
)
def test_cli_bad_args(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def _wait_for(path: Path, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "workload never created its hold file"
        time.sleep(0.02)
    return json.loads(path.read_text())


def test_hold_file_then_corruption_is_reported(tmp_path: Path) -> None:
    """A byte changed behind the workload's back while it holds is found by both phases."""
    hold, seed = tmp_path / "hold", 11
    page = int(np.flatnonzero(w.page_kinds(seed, np.arange(2048)) != 0)[10])
    with subprocess.Popen(
        [sys.executable, "-m", "tierswap.workload", "--size", "8M", "--seed", str(seed),
         "--hold-file", str(hold)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        info = _wait_for(hold)
        assert info["pid"] == proc.pid and info["pages"] == 2048
        try:
            fd = os.open(f"/proc/{proc.pid}/mem", os.O_RDWR)
        except OSError:
            hold.unlink()
            proc.communicate(timeout=60)
            pytest.skip("cannot write /proc/<pid>/mem here")
        try:
            addr = info["addr"] + page * w.PAGE + 123
            byte = os.pread(fd, 1, addr)
            os.pwrite(fd, bytes([byte[0] ^ 0x40]), addr)
        finally:
            os.close(fd)
        hold.unlink()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    res = json.loads(out)
    assert res["ok"] is False and res["bad_pages"] == 1 and res["hold_timed_out"] is False
    for phase in ("seq", "rand"):
        assert res["phases"][phase]["bad_pages"] == 1
        assert res["phases"][phase]["first_bad"] == [page]


def test_hold_timeout_fails_the_run(tmp_path: Path) -> None:
    r = run_cli("--size", "1M", "--hold-file", str(tmp_path / "h"), "--hold-timeout", "0.3")
    assert r.returncode == 1
    res = json.loads(r.stdout)
    assert res["hold_timed_out"] is True and res["bad_pages"] == 0 and res["ok"] is False


def test_run_in_process_with_small_chunks() -> None:
    """Chunk boundaries that do not divide the page count still cover every page."""
    res = w.run(300 * w.PAGE, seed=2, chunk_pages=64, mix={"text": 1, "random": 1})
    assert res["ok"] is True and res["pages"] == 300
