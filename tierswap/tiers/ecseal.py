"""Sealing of erasure-coded fragments: AES-256-GCM per 4 KiB block of each fragment.

Why per fragment and not per tier block (tierswap.crypto): a fragment is what a target holds,
so what is authenticated must name the fragment. The additional data binds the segment, the
fragment index (0..K-1 data, K..K+M-1 parity), the target it is stored on and the block within
the fragment, so a target can neither read a fragment nor hand back another fragment, another
segment's fragment or another target's copy in its place; and since the tag held here is the
latest one, it cannot roll a block back to an earlier write either.

Scheme, per block ``b`` of fragment ``f`` of segment ``s`` stored on target ``t``:
  nonce = 32 zero bits || 64-bit big-endian counter (starts at 1, +1 per sealed block)
  AD    = s (u32) || f (u16) || t (u16) || b (u32) || 4096 (u32) || context
The counter never repeats under one key (2^64 seals), as in tierswap.crypto, whose bounds
discussion applies unchanged.

Secrets stay in memory only. `FragmentSecrets` is the one owner of the key, the counters and
the tags (24 bytes per 4 KiB block of every fragment slot, reserved once, faulted in where
written); it is laid over a caller's buffer (the kit memfd `secrets.T`, so a replacement
process adopts it after a crash: tierswap/kitstate.py) or over anonymous memory of its own.
Nothing here is ever written to disk or logged, and the key is never in a Python bytes object:
it is read from the kernel's random source into the buffer, where the AEAD copies it from.
The next counter is stored in the buffer before the counters it hands out are used
(`take_counters`), so an adopting process continues after every counter its predecessor could
have used: no nonce repeats across a crash.

A block whose counter is 0 was never sealed in this segment's life: its plaintext is zero by
definition (the store never writes such a block). Callers may only rely on that for fragments
they know to be complete (not missing), which is the erasure store's bookkeeping.
"""

from __future__ import annotations

import mmap
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tierswap.crypto import BLOCK, KEY_BYTES, TAG, AuthenticationError, random_into
from tierswap.hardening import dontdump
from tierswap.kitstate import count_nonzero_rows

_NONCE = struct.Struct(">IQ")
_AD = struct.Struct(">IHHII")  # the whole AD but the context; built in two parts when sealing
_AD_HEAD = struct.Struct(">IHH")
_AD_TAIL = struct.Struct(">I")
_HEADER = 64  # key, the next counter, padding: keeps the arrays 8-byte aligned


class FragmentSecrets:
    """Key, per-block counters and tags for `nseg x nfrag x fblocks` fragment blocks.

    Layout of the buffer (``nbytes()`` long): key (32 bytes) | next counter (u64) | pad |
    counters (u64 each) | tags (16 bytes each). ``fresh=True`` puts a new key into a zeroed
    buffer; ``fresh=False`` adopts what the buffer already holds (the memfd case).
    """

    def __init__(self, nseg: int, nfrag: int, fblocks: int, *,
                 buffer: memoryview | bytearray | None = None, fresh: bool = True) -> None:
        self.shape = (nseg, nfrag, fblocks)
        count = nseg * nfrag * fblocks
        need = self.nbytes(nseg, nfrag, fblocks)
        own = buffer is None
        if buffer is None:  # anonymous, reserved but not populated, out of core dumps
            self._map = mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                  | getattr(mmap, "MAP_NORESERVE", 0))
            dontdump(self._map)
            buffer = memoryview(self._map)
        buf = memoryview(buffer).cast("B")
        if len(buf) < need:
            raise ValueError(f"secrets buffer holds {len(buf)} bytes, needs {need}")
        self._buf = buf
        self._next = np.frombuffer(buf, np.uint64, 1, KEY_BYTES)
        self.ctr = np.frombuffer(buf, np.uint64, count, _HEADER).reshape(self.shape)
        self.tags = np.frombuffer(buf, np.uint8, count * TAG, _HEADER + 8 * count).reshape(
            (*self.shape, TAG))
        key = buf[:KEY_BYTES]
        try:
            if fresh:  # the buffer is zero (a new memfd, anonymous memory)
                random_into(key)
                self._next[0] = 1
            self.aead = AESGCM(key)  # copies the key into its OpenSSL context
            if own:  # nothing outlives us: keep no copy of the key at all
                key[:] = bytes(KEY_BYTES)
        finally:
            key.release()

    @staticmethod
    def nbytes(nseg: int, nfrag: int, fblocks: int) -> int:
        return _HEADER + nseg * nfrag * fblocks * (8 + TAG)

    def take_counters(self, n: int) -> int:
        """Reserve `n` consecutive nonce counters; returns the first."""
        first = int(self._next[0])
        self._next[0] = first + n
        return first


class FragmentSealer:
    """Seal and open whole blocks of fragments. Synchronous, trio thread only."""

    def __init__(self, secrets: FragmentSecrets, context: bytes) -> None:
        self.secrets = secrets
        self._context = bytes(context)
        self._scratch = bytearray(BLOCK + TAG)
        self.sealed_blocks = 0

    def _ad(self, seg: int, frag: int, target: int, block: int) -> bytes:
        return _AD.pack(seg, frag, target, block, BLOCK) + self._context

    def seal(self, seg: int, frag: int, target: int, first: int,
             plain: bytes | bytearray | memoryview,
             *, commit: bool = True) -> tuple[bytearray, np.ndarray, np.ndarray]:
        """Seal whole blocks `first..` of a fragment bound for `target`.

        Returns (ciphertext, counters, tags). With ``commit`` the counters and tags are
        recorded at once (a writer that owns the fragment); without, the caller records them
        with `commit` once the ciphertext is stored (a rebuild that must not disturb the
        copy still being read until then).
        """
        src = memoryview(plain).cast("B")
        n = len(src) // BLOCK
        if len(src) != n * BLOCK or first < 0 or first + n > self.secrets.shape[2]:
            raise ValueError("fragment seal outside the fragment or not whole blocks")
        out = bytearray(n * BLOCK + TAG)
        mv = memoryview(out)
        tagbuf = bytearray(n * TAG)
        ctr = self.secrets.take_counters(n)
        aead = self.secrets.aead
        head = _AD_HEAD.pack(seg, frag, target)
        tail = _AD_TAIL.pack(BLOCK) + self._context
        for i in range(n):
            at = i * BLOCK
            aead.encrypt_into(_NONCE.pack(0, ctr + i), src[at : at + BLOCK],
                              head + (first + i).to_bytes(4, "big") + tail,
                              mv[at : at + BLOCK + TAG])
            tagbuf[i * TAG : (i + 1) * TAG] = mv[at + BLOCK : at + BLOCK + TAG]
        self.sealed_blocks += n
        del mv
        out[n * BLOCK :] = b""  # each tag was overwritten by the next block; drop the last
        ctrs = np.arange(ctr, ctr + n, dtype=np.uint64)
        tags = np.frombuffer(tagbuf, np.uint8).reshape(n, TAG)
        if commit:
            self.commit(seg, frag, first, ctrs, tags)
        return out, ctrs, tags

    def commit(self, seg: int, frag: int, first: int, ctrs: np.ndarray, tags: np.ndarray) -> None:
        n = len(ctrs)
        self.secrets.ctr[seg, frag, first : first + n] = ctrs
        self.secrets.tags[seg, frag, first : first + n] = tags

    def snapshot(self, seg: int, frag: int, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Counters and tags of blocks [first, first+n), taken before a read's first await."""
        s = self.secrets
        return (s.ctr[seg, frag, first : first + n].copy(),
                s.tags[seg, frag, first : first + n].copy())

    def open(self, seg: int, frag: int, target: int, first: int,
             raw: bytes | bytearray | memoryview,
             snap: tuple[np.ndarray, np.ndarray]) -> bytearray:
        """Authenticate and decrypt blocks read back; never-sealed blocks open as zeros.

        Raises AuthenticationError (offset = block index in the fragment) for the first block
        that fails.
        """
        src = memoryview(raw).cast("B")
        ctrs, tags = snap
        n = len(ctrs)
        out = bytearray(n * BLOCK)
        omv = memoryview(out)
        scratch = self._scratch
        aead = self.secrets.aead
        for i in range(n):
            ctr = int(ctrs[i])
            if ctr == 0:
                continue  # never sealed: zero
            scratch[:BLOCK] = src[i * BLOCK : (i + 1) * BLOCK]
            scratch[BLOCK:] = tags[i].tobytes()
            try:
                aead.decrypt_into(_NONCE.pack(0, ctr), scratch,
                                  self._ad(seg, frag, target, first + i),
                                  omv[i * BLOCK : (i + 1) * BLOCK])
            except InvalidTag:
                raise AuthenticationError(first + i) from None
        return out

    def forget(self, seg: int, frag: int | None = None) -> None:
        """The segment (or one fragment of it) holds nothing any more."""
        if frag is None:
            self.secrets.ctr[seg] = 0
        else:
            self.secrets.ctr[seg, frag] = 0

    def sealed_counts(self) -> np.ndarray:
        """Sealed blocks per (segment, fragment): what each fragment occupies on its target."""
        return count_nonzero_rows(self.secrets.ctr)  # (a kit's memfd stays sparse)

    def last_sealed(self, seg: int, frag: int) -> int | None:
        nz = np.flatnonzero(self.secrets.ctr[seg, frag])
        return int(nz[-1]) if len(nz) else None
