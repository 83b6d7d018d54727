"""Sealing of stored pages with AES-256-GCM, shared by the remote tier and the encrypted file tier.

Why blocks and not pieces: the device writes a *piece* (a batch of compressed pages) in one
call but later reads *runs*, sub-ranges of a piece, because overwriting pages splits runs. A
tag over the whole piece would force every 4 KiB swap-in to fetch and decrypt up to 1 MiB.
So the unit of sealing is a fixed 4 KiB block of the tier's address space: a piece starts on
a block boundary (the tier's SegmentSpace allocates with align=4096) and its last block is
zero-padded, so a read of any sub-range fetches and opens only the blocks it touches (at most
the run plus two partial blocks).

Why the tags stay in RAM: ciphertext has the same length as plaintext, so nothing on the
store changes shape (no allocator hook, no trailer to read first). The 8-byte nonce counter
and 16-byte tag of every block live in two fixed arrays of this process, 24 bytes per 4 KiB
of tier capacity (0.6 %, allocated once; under mlockall(MCL_ONFAULT) only blocks ever
written cost memory). The key is made at creation with os.urandom and never leaves this
object, so nothing written is readable after the process ends, which is also why keeping
the tags only here loses nothing. Keeping them here is stronger than storing them beside the
data: a block replayed from elsewhere *or from an earlier write to the same place* does not
match the tag we hold, so the store cannot roll a page back.

Scheme, per block at tier offset ``off`` (a multiple of 4096):
  nonce = 32 zero bits || 64-bit big-endian counter (starts at 1, +1 per sealed block)
  AD    = off (u64) || 4096 (u32) || context (names the tier kind, tier and shard)
  (ciphertext, tag) = AES-256-GCM(key, nonce, block, AD)
Bounds: a counter never repeats a nonce under one key (2^64 seals; random 96-bit nonces would
need a rekey after ~2^32). The usual GCM data limit (keep the total sealed under ~2^48
blocks of 16 bytes, 4 PiB, for a distinguishing advantage below ~2^-33) is far beyond what a
swap tier writes in a daemon's lifetime; no rekeying is implemented.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Awaitable, Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 4096
TAG = 16
KEY_BYTES = 32
_NONCE = struct.Struct(">IQ")
_AD = struct.Struct(">QI")


class AuthenticationError(Exception):
    """A block did not authenticate: tampered, corrupted, stale, or never sealed here."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"block at tier offset {offset} failed authentication")
        self.offset = offset


def padded(n: int) -> int:
    """Bytes a sealed piece of ``n`` bytes occupies: whole blocks."""
    return -(-n // BLOCK) * BLOCK


class BlockSealer:
    """AES-256-GCM over fixed 4 KiB blocks of one tier instance's address space.

    Synchronous and not thread-safe: called on the trio thread only (a 4 KiB block seals in
    about a microsecond, so there is nothing to gain from a worker thread).
    """

    def __init__(self, capacity: int, context: bytes, *, key: bytes | None = None) -> None:
        if capacity % BLOCK:
            raise ValueError("capacity must be a whole number of blocks")
        self.nblocks = capacity // BLOCK
        self._aead = AESGCM(key if key is not None else os.urandom(KEY_BYTES))
        self._context = bytes(context)
        self._ctr = np.zeros(self.nblocks, np.uint64)  # 0: never sealed
        self._tags = bytearray(self.nblocks * TAG)
        self._next = 1
        self._scratch = bytearray(BLOCK + TAG)
        self.auth_failures = 0  # counted by `read`; tiers that open directly count themselves
        self.sealed_blocks = 0

    @classmethod
    def for_tier(cls, kind: str, name: str, shard: int, capacity: int) -> BlockSealer:
        return cls(capacity, f"tierswap/{kind}/{name}/shard{shard}".encode())

    def _ad(self, block: int) -> bytes:
        return _AD.pack(block * BLOCK, BLOCK) + self._context

    def _check(self, base: int, length: int) -> None:
        if base % BLOCK or base < 0 or base + length > self.nblocks * BLOCK:
            raise ValueError(f"sealed extent [{base}, {base + length}) is unaligned or outside "
                             f"the tier")

    # ---------------------------------------------------------------- writing

    def seal(self, base: int, data: bytes | memoryview) -> memoryview:
        """Seal ``data`` stored at tier offset ``base``; return ``padded(len)`` bytes to store.

        Records each block's counter and tag, replacing whatever an earlier write there had.
        """
        src = memoryview(data).cast("B")
        n = len(src)
        total = padded(n)
        self._check(base, total)
        out = bytearray(total + TAG)  # the tag of block i lands where block i+1 then goes
        mv = memoryview(out)
        first = base // BLOCK
        full = n // BLOCK
        for i in range(total // BLOCK):
            if i < full:
                plain: bytes | memoryview = src[i * BLOCK : (i + 1) * BLOCK]
            else:  # the last, partial block: zero padding is sealed with it
                plain = bytes(src[i * BLOCK :]) + bytes(total - n)
            blk = first + i
            ctr = self._next
            self._next += 1
            at = i * BLOCK
            self._aead.encrypt_into(_NONCE.pack(0, ctr), plain, self._ad(blk),
                                    mv[at : at + BLOCK + TAG])
            self._tags[blk * TAG : (blk + 1) * TAG] = mv[at + BLOCK : at + BLOCK + TAG]
            self._ctr[blk] = ctr
        self.sealed_blocks += total // BLOCK
        return mv[:total]

    def forget(self, base: int, length: int) -> None:
        """Whole blocks inside [base, base+length) no longer hold anything (trimmed)."""
        a = -(-base // BLOCK)
        b = (base + length) // BLOCK
        if a < b:
            self._ctr[a:b] = 0

    # ---------------------------------------------------------------- reading

    @staticmethod
    def span(base: int, length: int) -> tuple[int, int]:
        """The block-aligned extent [start, end) that holds [base, base+length)."""
        return base - base % BLOCK, padded(base + length)

    def snapshot(self, start: int, end: int) -> tuple[list[int], bytes]:
        """Counters and tags of blocks [start, end), taken before a read's first await."""
        a, b = start // BLOCK, end // BLOCK
        return self._ctr[a:b].tolist(), bytes(self._tags[a * TAG : b * TAG])

    def is_sealed(self, offset: int) -> bool:
        return bool(self._ctr[offset // BLOCK])

    def last_sealed(self, start: int, end: int) -> int | None:
        """Offset of the highest sealed block in [start, end), or None."""
        nz = np.flatnonzero(self._ctr[start // BLOCK : end // BLOCK])
        return start + int(nz[-1]) * BLOCK if len(nz) else None

    def open(self, start: int, raw: bytes | bytearray | memoryview,
             snap: tuple[list[int], bytes] | None = None) -> bytearray:
        """Authenticate and decrypt whole blocks read back from ``start``.

        Raises AuthenticationError for the first block that fails (counting is the caller's:
        a stale replica is not tampering). Never returns unauthenticated bytes.
        """
        src = memoryview(raw).cast("B")
        n = len(src)
        self._check(start, n)
        if n % BLOCK:
            raise ValueError("sealed reads cover whole blocks")
        ctrs, tags = snap if snap is not None else self.snapshot(start, start + n)
        out = bytearray(n)
        omv = memoryview(out)
        scratch = self._scratch
        first = start // BLOCK
        for i in range(n // BLOCK):
            ctr = ctrs[i]
            if ctr == 0:
                raise AuthenticationError(start + i * BLOCK)
            scratch[:BLOCK] = src[i * BLOCK : (i + 1) * BLOCK]
            scratch[BLOCK:] = tags[i * TAG : (i + 1) * TAG]
            try:
                self._aead.decrypt_into(_NONCE.pack(0, ctr), scratch, self._ad(first + i),
                                        omv[i * BLOCK : (i + 1) * BLOCK])
            except InvalidTag:
                raise AuthenticationError(start + i * BLOCK) from None
        return out

    async def read(self, base: int, length: int,
                   read_raw: Callable[[int, int], Awaitable[bytes]], name: str) -> bytes:
        """Fetch the covering blocks with ``read_raw(start, nbytes)``, open them, slice.

        For tiers with a single copy (the file tier): a failure is TierError(EIO) and counted
        in ``auth_failures``.
        """
        from tierswap.tiers.base import TierError

        start, end = self.span(base, length)
        snap = self.snapshot(start, end)
        raw = await read_raw(start, end - start)
        try:
            plain = self.open(start, raw, snap)
        except AuthenticationError as e:
            self.auth_failures += 1
            raise TierError(errno.EIO, f"tier {name}: {e}") from None
        return bytes(plain[base - start : base - start + length])
