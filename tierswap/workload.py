"""A memory workload that writes known content and verifies every page.

Page content is a pure function of (seed, page index), so any page can be regenerated and
checked without keeping a copy: the copy would live in the same memory cgroup and defeat the
point, which is to have most of the region swapped out. The kinds of page (zero, text-like,
heap-like structures, long byte runs, incompressible) mimic what a swap device really sees,
so the same run also exercises zero detection and compression.

Run ``python -m tierswap.workload --help``; it prints one JSON line and exits 0 iff every page
verified, 1 on a mismatch (or a --hold-file nobody removed in time), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import NoReturn

import numpy as np

PAGE = 4096
WORDS = PAGE // 8
HEADER_WORDS = 2  # word 0: page index, word 1: seed (little-endian u64 each)
CHUNK_PAGES = 1024

KINDS: tuple[str, ...] = ("zero", "text", "struct", "run", "random")
DEFAULT_MIX: dict[str, float] = {"zero": 20, "text": 25, "struct": 25, "run": 10, "random": 20}
PHASES: tuple[str, ...] = ("fill", "seq", "rand")

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_KIND_SALT = 0x6B696E64  # separate hash streams for kind, parameters and page bytes
_PARAM_SALT = 0x706172616D
_TEXT_BANK_BYTES = 1 << 18
_TEXT_SEGMENTS = 4
_TEXT_SEG_BYTES = (PAGE - 8 * HEADER_WORDS) // _TEXT_SEGMENTS
_KIND_BITS = 24
_RUN_MAX_TAIL = 256  # bytes of noise after a run page's repeated byte

_VOCAB = (
    b"INFO ", b"WARN ", b"DEBUG ", b"ERROR ", b"2024-05-17T", b"12:", b"34:", b"56.", b"789Z ",
    b"worker[", b"]: ", b"GET ", b"POST ", b"/api/v1/", b"items/", b"users/", b"sessions/",
    b" 200 ", b" 404 ", b" 503 ", b"ms\n", b"\n", b'{"id": ', b', "name": "', b'", ',
    b'"status": "ok"', b'"status": "error"', b', "tags": ["', b'", "', b'"]}', b"}\n",
    b'"user_id": ', b'"created_at": ', b'"value": ', b"true", b"false", b"null", b", ",
    b"alpha", b"beta", b"gamma", b"delta", b"cache", b"miss", b"hit", b"request", b"response",
    b"connection", b"timeout", b"retry", b"swap", b"page", b"slot", b"tier", b"zram", b"disk",
    b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b"42", b"1024", b"4096",
    b"com.example.service.", b"Handler", b"Factory", b"Impl", b"java.lang.String", b"<init>",
    b"/usr/lib/python3.11/", b"site-packages/", b".py", b"line ", b"def ", b"self.", b"return ",
    b"    ", b"  ", b" ", b" ", b" ", b"= ", b"(", b")", b"; ", b"\t",
)


class WorkloadError(ValueError):
    """Bad arguments; reported as one line with exit status 2."""


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (array ops wrap without warnings)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(_C1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_C2)
    z ^= z >> np.uint64(31)
    return z


def _seed_u64(seed: int) -> int:
    return seed & _M64


def _page_keys(seed: int, idx: np.ndarray) -> np.ndarray:
    """Counter-based per-page key: independent of which other pages share the batch."""
    s = _mix64(np.array([(_seed_u64(seed) + _GOLDEN) & _M64], dtype=np.uint64))
    k = idx.astype(np.uint64) * np.uint64(_GOLDEN)
    k ^= s
    return _mix64(_mix64(k))


@cache
def _word_offsets() -> np.ndarray:
    return np.arange(1, WORDS + 1, dtype=np.uint64) * np.uint64(_GOLDEN)


def _word_stream(keys: np.ndarray, first: int = HEADER_WORDS) -> np.ndarray:
    """Pseudo-random uint64 words, shape (len(keys), WORDS - first), one stream per page key."""
    z = keys[:, None] + _word_offsets()[None, first:]
    return _mix64(z)


@cache
def _text_bank() -> np.ndarray:
    """A fixed stream of log/JSON-like tokens that text pages are cut from (built once)."""
    toks = np.frombuffer(b"".join(_VOCAB), dtype=np.uint8)
    lens = np.array([len(t) for t in _VOCAB], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    n_tokens = _TEXT_BANK_BYTES // int(lens.min()) + 1
    ids = (_mix64(np.arange(n_tokens, dtype=np.uint64) + np.uint64(_GOLDEN)) % np.uint64(len(lens)))
    ids = ids.astype(np.int64)
    tl = lens[ids]
    ends = np.cumsum(tl)
    n = int(np.searchsorted(ends, _TEXT_BANK_BYTES)) + 1
    ids, tl, ends = ids[:n], tl[:n], ends[:n]
    # Byte i of the bank comes from token t at offset (i - start of t in the bank).
    src = np.repeat(starts[ids] - (ends - tl), tl) + np.arange(int(ends[-1]))
    return toks[src][:_TEXT_BANK_BYTES].copy()


def normalise_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    """Weights for every kind, summing to 1; kinds left out of a given mix get weight 0."""
    m = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(m) - set(KINDS)
    if unknown:
        raise WorkloadError(f"unknown page kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
    if any(v < 0 for v in m.values()):
        raise WorkloadError("mix weights must be >= 0")
    total = float(sum(m.values()))
    if total <= 0:
        raise WorkloadError("mix weights must not all be zero")
    return {k: m.get(k, 0) / total for k in KINDS}


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``zero=20,text=25,...`` (weights, normalised later)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(val)
        except ValueError:
            raise WorkloadError(f"bad --mix item {part!r}, expected kind=weight") from None
    normalise_mix(out)
    return out


@cache
def _thresholds(mix_items: tuple[tuple[str, float], ...]) -> np.ndarray:
    fr = normalise_mix(dict(mix_items))
    cum = np.cumsum([fr[k] for k in KINDS])[:-1]
    return np.round(cum * (1 << _KIND_BITS)).astype(np.uint64)


def page_kinds(seed: int, idx: np.ndarray, mix: Mapping[str, float] | None = None) -> np.ndarray:
    """Kind number (index into KINDS) of each page, chosen by a hash of (seed, index)."""
    idx = np.asarray(idx, dtype=np.int64)
    th = _thresholds(tuple(sorted((mix if mix is not None else DEFAULT_MIX).items())))
    h = _mix64(_page_keys(seed, idx) ^ np.uint64(_KIND_SALT)) >> np.uint64(64 - _KIND_BITS)
    return np.searchsorted(th, h, side="right").astype(np.int8)


def expected_pages(
    seed: int, idx: np.ndarray, mix: Mapping[str, float] | None = None
) -> np.ndarray:
    """The content of pages ``idx`` for ``seed``: shape (len(idx), 4096), uint8."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    n = len(idx)
    out = np.zeros((n, WORDS), dtype=np.uint64)
    if n == 0:
        return out.view(np.uint8)
    kinds = page_kinds(seed, idx, mix)
    keys = _page_keys(seed, idx)
    params = _mix64(keys ^ np.uint64(_PARAM_SALT))
    nz = kinds != 0
    out[nz, 0] = idx[nz].astype(np.uint64)
    out[nz, 1] = np.uint64(_seed_u64(seed))
    body = out[:, HEADER_WORDS:]

    rows = np.flatnonzero(kinds == KINDS.index("random"))
    if len(rows):
        body[rows] = _word_stream(keys[rows])

    rows = np.flatnonzero(kinds == KINDS.index("struct"))
    if len(rows):
        body[rows] = _struct_words(seed, keys[rows], params[rows])

    bytes_view = out.view(np.uint8)
    rows = np.flatnonzero(kinds == KINDS.index("text"))
    if len(rows):
        bank = _text_bank()
        windows = np.lib.stride_tricks.sliding_window_view(bank, _TEXT_SEG_BYTES)
        offs = (
            _word_stream(params[rows], WORDS - _TEXT_SEGMENTS)
            % np.uint64(len(bank) - _TEXT_SEG_BYTES + 1)
        ).astype(np.int64)
        bytes_view[rows, 8 * HEADER_WORDS :] = windows[offs].reshape(len(rows), -1)

    rows = np.flatnonzero(kinds == KINDS.index("run"))
    if len(rows):
        p = params[rows]
        fill = (p % np.uint64(255) + np.uint64(1)).astype(np.uint8)
        tail = (np.uint64(32) + (p >> np.uint64(8)) % np.uint64(_RUN_MAX_TAIL - 31))
        tail = tail.astype(np.int64)
        tw = _RUN_MAX_TAIL // 8
        noise = _word_stream(keys[rows], WORDS - tw).view(np.uint8)
        pos = np.arange(PAGE - 8 * tw, PAGE)
        bytes_view[rows, 8 * HEADER_WORDS : PAGE - 8 * tw] = fill[:, None]
        bytes_view[rows, PAGE - 8 * tw :] = np.where(
            pos[None, :] >= PAGE - tail[:, None], noise, fill[:, None]
        )
    return bytes_view


def _struct_words(seed: int, keys: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Heap-like records of 4 words: pointers sharing a high part, small ints, padding."""
    arena = 0x00007F0000000000 | ((_seed_u64(seed) * 0x2545F491) & 0xFFFF) << 24
    # Field kinds: pointer into a 16 MiB arena (8-aligned), small int, two small u32 counters,
    # zero padding. Each is (h & mask) | add; field 0 is always a pointer so that no page
    # degenerates to mostly zeros.
    mask = np.array([0xFFFFF8, 0x3FF, 0xFFF000000FF, 0], dtype=np.uint64)
    add = np.array([arena, 0, 0, 0], dtype=np.uint64)
    fk = ((params[:, None] >> np.arange(0, 8, 2, dtype=np.uint64)) & np.uint64(3)).astype(np.intp)
    fk[:, 0] = 0
    field = np.arange(HEADER_WORDS, WORDS) % 4
    h = _word_stream(keys)
    h &= mask[fk][:, field]
    h |= add[fk][:, field]
    return h


def content_stats(
    seed: int, npages: int, mix: Mapping[str, float] | None = None
) -> dict[str, int]:
    """How many of pages 0..npages-1 are of each kind (e.g. to predict stored zero pages)."""
    counts = np.zeros(len(KINDS), dtype=np.int64)
    step = 1 << 20
    for start in range(0, npages, step):
        k = page_kinds(seed, np.arange(start, min(npages, start + step)), mix)
        counts += np.bincount(k, minlength=len(KINDS))
    return {name: int(c) for name, c in zip(KINDS, counts, strict=True)}


def verify_pages(
    seed: int, idx: np.ndarray, actual: np.ndarray, mix: Mapping[str, float] | None = None
) -> np.ndarray:
    """Indices (from ``idx``) whose bytes in ``actual`` differ from the expected content."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    exp = expected_pages(seed, idx, mix).view(np.uint64)
    act = np.ascontiguousarray(actual).reshape(len(idx), PAGE).view(np.uint64)
    return idx[np.any(exp != act, axis=1)]


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64K``, ``512M``, ``1G``, ``2T`` (1024-based, optional ``iB``/``B``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise WorkloadError(f"bad size {text!r}, expected e.g. 64M or 1G")
    mult = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * mult)


class _Report:
    """Per-phase timing and bad-page bookkeeping for the JSON summary."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.phases: dict[str, dict[str, object]] = {}
        self.bad: list[np.ndarray] = []

    def phase(self, name: str, seconds: float, bad: np.ndarray | None) -> None:
        rec: dict[str, object] = {
            "seconds": round(seconds, 4),
            "mb_per_s": round(self.size / 1e6 / max(seconds, 1e-9), 1),
        }
        if bad is not None:
            rec["bad_pages"] = len(bad)
            rec["first_bad"] = np.sort(bad)[:8].tolist()
            self.bad.append(bad)
        self.phases[name] = rec

    def distinct_bad(self) -> int:
        return len(np.unique(np.concatenate(self.bad))) if self.bad else 0


def _hold(path: Path, timeout: float, info: dict[str, int]) -> bool:
    """Announce that the pages are written, then wait for the test to remove ``path``.

    The file holds one JSON line (pid, region address and size) so a test can find the
    process, or deliberately corrupt a page through /proc/<pid>/mem to check detection.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}) + "\n")
    tmp.replace(path)  # atomic, so a watcher never sees a half-written file
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run(
    size: int,
    seed: int,
    phases: Sequence[str] = PHASES,
    mix: Mapping[str, float] | None = None,
    hold_file: Path | None = None,
    hold_timeout: float = 600.0,
    chunk_pages: int = CHUNK_PAGES,
) -> dict[str, object]:
    """Fill an anonymous private mapping, then verify it; returns the JSON summary."""
    _check_args(size, phases, hold_timeout)
    normalise_mix(mix)
    npages = size // PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    # 4 KiB pages, so random reads swap in single pages rather than whole huge pages.
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    rep = _Report(size)
    hold_timed_out = False
    try:
        pages = np.frombuffer(region, dtype=np.uint8).reshape(npages, PAGE)
        for name in phases:
            t0 = time.perf_counter()
            bad: np.ndarray | None = None
            found: list[np.ndarray] = []
            if name == "fill":
                for s in range(0, npages, chunk_pages):
                    e = min(npages, s + chunk_pages)
                    pages[s:e] = expected_pages(seed, np.arange(s, e), mix)
            elif name == "seq":
                for s in range(0, npages, chunk_pages):
                    e = min(npages, s + chunk_pages)
                    found.append(verify_pages(seed, np.arange(s, e), pages[s:e], mix))
            else:
                perm = np.random.default_rng(_seed_u64(seed)).permutation(npages)
                for s in range(0, npages, chunk_pages):
                    sel = perm[s : s + chunk_pages]
                    found.append(verify_pages(seed, sel, pages[sel], mix))
            if name != "fill":
                bad = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
            rep.phase(name, time.perf_counter() - t0, bad)
            if name == "fill" and hold_file is not None:
                info = {"addr": int(pages.ctypes.data), "size_bytes": size, "pages": npages}
                hold_timed_out = not _hold(hold_file, hold_timeout, info)
                if hold_timed_out:
                    print(f"workload: hold file {hold_file} not removed within "
                          f"{hold_timeout:g} s; verifying anyway", file=sys.stderr)
        del pages
    finally:
        # A view may survive in an exception traceback; the mapping then goes at exit.
        with contextlib.suppress(BufferError):
            region.close()
    bad_total = rep.distinct_bad()
    summary: dict[str, object] = {
        "size_bytes": size,
        "pages": npages,
        "seed": seed,
        "mix": normalise_mix(mix),
        "phases": rep.phases,
        "bad_pages": bad_total,
        "ok": bad_total == 0 and not hold_timed_out,
    }
    if hold_file is not None:
        summary["hold_timed_out"] = hold_timed_out
    return summary


def _check_args(size: int, phases: Sequence[str], hold_timeout: float) -> None:
    if size < PAGE or size % PAGE:
        raise WorkloadError(f"size must be a positive multiple of {PAGE} bytes, got {size}")
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise WorkloadError(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    if not phases or phases[0] != "fill" or len(set(phases)) != len(phases):
        raise WorkloadError("phases must start with fill and not repeat, e.g. fill,seq,rand")
    if hold_timeout <= 0:
        raise WorkloadError("--hold-timeout must be > 0")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise WorkloadError(message)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m tierswap.workload", description=__doc__.split("\n")[0])
    ap.add_argument("--size", required=True, help="region size, e.g. 512M, 1G (1024-based)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--phases", default="fill,seq,rand", help="subset of fill,seq,rand")
    ap.add_argument("--mix", default=None, help="kind weights, e.g. zero=20,text=25,struct=25,"
                    "run=10,random=20 (kinds left out get 0)")
    ap.add_argument("--hold-file", type=Path, default=None,
                    help="after fill, create PATH and wait until it is removed")
    ap.add_argument("--hold-timeout", type=float, default=600.0)
    try:
        a = ap.parse_args(argv)
        summary = run(
            parse_size(a.size),
            a.seed,
            [p.strip() for p in a.phases.split(",") if p.strip()],
            parse_mix(a.mix) if a.mix is not None else None,
            a.hold_file,
            a.hold_timeout,
        )
    except WorkloadError as e:
        print(f"workload: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # mmap or hold file: environment problem, not a data mismatch
        print(f"workload: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
