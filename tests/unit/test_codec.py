"""Batch page codec: exact round trips, raw storage of incompressible pages, corruption caught."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st

from tierswap.codec import INLINE_PAGES, Codec
from tierswap.config import PAGE_SIZE, Compression
from tierswap.workload import KINDS, expected_pages, page_kinds

ZSTD1 = Compression("zstd", 1)


def pages_of_kind(kind: str, n: int, seed: int = 7) -> np.ndarray:
    idx = np.arange(20000)
    sel = idx[page_kinds(seed, idx) == KINDS.index(kind)][:n]
    assert len(sel) == n
    return expected_pages(seed, sel)


def round_trip(codec: Codec, pages: np.ndarray) -> tuple[np.ndarray, bytes]:
    clens, blob = codec.compress(pages)
    assert clens.dtype == np.uint16 and len(clens) == len(pages)
    assert int(clens.sum()) == len(blob)
    assert (clens <= PAGE_SIZE).all(), "a page is never stored larger than raw"
    out = np.zeros_like(pages)
    codec.decompress_into(blob, clens, out)
    assert np.array_equal(out, pages)
    return clens, blob


@pytest.mark.parametrize("n", [1, 2, INLINE_PAGES, INLINE_PAGES + 1, 33, 256])
def test_round_trip_mixed_workload_pages(n: int) -> None:
    pages = expected_pages(12, np.arange(1000, 1000 + n))
    round_trip(Codec(ZSTD1), pages)


@pytest.mark.parametrize("n", [1, INLINE_PAGES + 3])
def test_text_and_struct_pages_compress(n: int) -> None:
    for kind in ("text", "struct", "run"):
        clens, _ = round_trip(Codec(ZSTD1), pages_of_kind(kind, n))
        assert (clens < PAGE_SIZE).all() and (clens > 0).all(), kind
    clens, _ = round_trip(Codec(ZSTD1), pages_of_kind("run", n))
    assert (clens < 1024).all()  # a repeated byte with a short noisy tail


@pytest.mark.parametrize("n", [1, INLINE_PAGES, INLINE_PAGES + 1, 40])
def test_incompressible_pages_stored_raw(n: int) -> None:
    pages = pages_of_kind("random", n)
    clens, blob = round_trip(Codec(ZSTD1), pages)
    assert (clens == PAGE_SIZE).all()
    assert blob == pages.tobytes()  # raw pages are the page bytes, not a zstd frame


@pytest.mark.parametrize("n", [3, 17])
def test_mixed_raw_and_compressed_in_one_batch(n: int) -> None:
    rnd, txt = pages_of_kind("random", n), pages_of_kind("text", n)
    pages = np.empty((2 * n, PAGE_SIZE), np.uint8)
    pages[0::2], pages[1::2] = rnd, txt
    clens, blob = round_trip(Codec(ZSTD1), pages)
    assert (clens[0::2] == PAGE_SIZE).all() and (clens[1::2] < PAGE_SIZE).all()
    offs = np.concatenate([[0], np.cumsum(clens, dtype=np.int64)])
    for i in range(0, 2 * n, 2):  # each raw page sits at its offset, verbatim
        assert blob[offs[i] : offs[i + 1]] == pages[i].tobytes()


@pytest.mark.parametrize("n", [2, 12])
def test_zero_pages_in_a_run_decode_to_zero(n: int) -> None:
    """The device stores zero pages as length 0 inside a run; decode leaves them zero."""
    codec = Codec(ZSTD1)
    pages = pages_of_kind("text", n)
    clens, blob = codec.compress(pages)
    run_lens = np.zeros(2 * n + 1, np.uint16)
    run_lens[1::2] = clens
    out = np.full((2 * n + 1, PAGE_SIZE), 0, np.uint8)
    codec.decompress_into(blob, run_lens, out)
    assert not out[0::2].any()
    assert np.array_equal(out[1::2], pages)


def test_inline_and_batch_paths_agree() -> None:
    """Frames are independent per page: the batch call gives what per-page calls give."""
    codec = Codec(ZSTD1)
    pages = expected_pages(5, np.arange(64))
    pages = pages[pages.any(axis=1)]
    clens_batch, blob_batch = codec.compress(pages)
    per_page = [codec.compress(pages[i : i + 1]) for i in range(len(pages))]
    assert np.array_equal(clens_batch, np.concatenate([c for c, _ in per_page]))
    assert blob_batch == b"".join(b for _, b in per_page)
    # and either path decodes the other's output
    out = np.zeros_like(pages)
    for i, (c, b) in enumerate(per_page):
        codec.decompress_into(b, c, out[i : i + 1])
    assert np.array_equal(out, pages)


def test_level_none() -> None:
    codec = Codec(Compression("none"))
    pages = expected_pages(3, np.arange(10))
    pages = pages[pages.any(axis=1)]
    clens, blob = round_trip(codec, pages)
    assert (clens == PAGE_SIZE).all() and blob == pages.tobytes()


@pytest.mark.parametrize("level", [-7, 1, 3, 19])
def test_levels_round_trip(level: int) -> None:
    pages = expected_pages(9, np.arange(2000, 2012))
    round_trip(Codec(Compression("zstd", level)), pages[pages.any(axis=1)])


def test_empty_batch() -> None:
    clens, blob = Codec(ZSTD1).compress(np.zeros((0, PAGE_SIZE), np.uint8))
    assert len(clens) == 0 and blob == b""


@pytest.mark.parametrize("n", [1, INLINE_PAGES, INLINE_PAGES + 1, 20])
@pytest.mark.parametrize("damage", ["magic", "truncate"])
def test_corrupt_data_raises(n: int, damage: str) -> None:
    codec = Codec(ZSTD1)
    pages = pages_of_kind("text", n)
    clens, blob = codec.compress(pages)
    victim = n // 2
    offs = np.concatenate([[0], np.cumsum(clens, dtype=np.int64)])
    if damage == "magic":
        bad = bytearray(blob)
        bad[offs[victim] : offs[victim] + 4] = b"\x00\x00\x00\x00"
        blob = bytes(bad)
    else:  # the map says the frame is shorter than it is
        clens = clens.copy()
        clens[victim] -= 8
        blob = blob[: offs[victim + 1] - 8] + blob[offs[victim + 1] :]
    with pytest.raises(zstd.ZstdError):
        codec.decompress_into(blob, clens, np.zeros_like(pages))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    first=st.integers(0, 2**30),
    n=st.integers(1, 40),
    level=st.sampled_from([1, 3]),
)
def test_round_trip_property(seed: int, first: int, n: int, level: int) -> None:
    pages = expected_pages(seed, np.arange(first, first + n))
    round_trip(Codec(Compression("zstd", level)), pages)


def test_threads_share_one_codec() -> None:
    codec = Codec(ZSTD1)
    batches = [expected_pages(s, np.arange(64)) for s in range(6)]
    errors: list[BaseException] = []

    def work(pages: np.ndarray) -> None:
        try:
            for _ in range(5):
                round_trip(codec, pages)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
