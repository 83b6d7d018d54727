"""Batch page compression with zstd: a request's pages in one call, never per page in Python.

A stored page is self-describing by its length: 0 is a zero page, PAGE_SIZE is the raw page
(it did not compress, and we never store it expanded), anything else is one zstd frame without
content size, checksum or dictionary id (they cost bytes and the map already knows the size).
The heavy calls release the GIL, so the daemon runs them in worker threads (see device.py).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

from tierswap.config import PAGE_SIZE, Compression

_ARANGE = np.arange(PAGE_SIZE, dtype=np.int64)
# Below this many pages the thread hop costs more than the work: compress/decompress inline.
INLINE_PAGES = 4


class Codec:
    """Compress and decompress batches of pages; safe to call from several threads at once."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._local = threading.local()
        self._params = (
            zstd.ZstdCompressionParameters.from_level(
                compression.level, write_content_size=False, write_checksum=False,
                write_dict_id=False,
            )
            if compression.algorithm == "zstd"
            else None
        )

    def _cctx(self) -> zstd.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstd.ZstdCompressor(compression_params=self._params)
        return c

    def _dctx(self) -> zstd.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstd.ZstdDecompressor()
        return d

    def compress(self, pages: np.ndarray) -> tuple[np.ndarray, bytes]:
        """Compress k non-zero pages ((k, PAGE_SIZE) uint8): (stored lengths u16, concatenation)."""
        k = len(pages)
        if self._params is None or k == 0:
            return np.full(k, PAGE_SIZE, np.uint16), pages.tobytes()
        if k <= INLINE_PAGES:
            c = self._cctx()
            frames = [c.compress(p) for p in pages]
        else:
            segs = np.empty((k, 2), np.uint64)
            segs[:, 0] = np.arange(0, k * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            segs[:, 1] = PAGE_SIZE
            frames = self._cctx().multi_compress_to_buffer(
                zstd.BufferWithSegments(np.ascontiguousarray(pages), segs.tobytes()), threads=0
            )
        lens = np.fromiter(map(len, frames), np.int64, k)
        raw = lens >= PAGE_SIZE
        if raw.any():
            lens[raw] = PAGE_SIZE
            parts = [pages[i] if raw[i] else frames[i] for i in range(k)]
            return lens.astype(np.uint16), b"".join(parts)
        return lens.astype(np.uint16), b"".join(frames)

    def decompress_into(self, blob: bytes | memoryview, lens: np.ndarray, out: np.ndarray) -> None:
        """Decode the pages of one run into `out` ((len(lens), PAGE_SIZE) uint8, pre-zeroed)."""
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        comp = (lens > 0) & (lens < PAGE_SIZE)
        raw = lens == PAGE_SIZE
        if raw.any():
            src = np.frombuffer(blob, np.uint8)
            out[raw] = src[offs[:-1][raw][:, None] + _ARANGE]
        k = int(comp.sum())
        if k == 0:
            return
        d = self._dctx()
        if k <= INLINE_PAGES:
            mv = memoryview(blob)
            for i in np.flatnonzero(comp).tolist():
                out[i] = np.frombuffer(
                    d.decompress(mv[offs[i] : offs[i + 1]], max_output_size=PAGE_SIZE), np.uint8
                )
            return
        segs = np.empty((k, 2), np.uint64)
        segs[:, 0] = offs[:-1][comp]
        segs[:, 1] = lens[comp]
        res = d.multi_decompress_to_buffer(
            zstd.BufferWithSegments(blob, segs.tobytes()),
            decompressed_sizes=np.full(k, PAGE_SIZE, np.uint64).tobytes(),
            threads=0,
        )
        out[comp] = np.frombuffer(b"".join(res), np.uint8).reshape(k, PAGE_SIZE)
