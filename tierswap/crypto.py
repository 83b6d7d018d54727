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
and 16-byte tag of every block live in a `TagStore`, 24 bytes per 4 KiB of tier capacity
(0.6 %), in memory reserved once and faulted in only where blocks are written (scans of
it read only resident pages: kitstate.count_nonzero_rows), so a 4 TiB tier costs nothing at
start (the full 24 GiB only once every block was written; config.py bounds the capacity so
that even that fits). The memory is MADV_DONTDUMP. Keeping the tags
here is stronger than storing them beside the data: a block replayed from elsewhere *or from
an earlier write to the same place* does not match the tag we hold, so the store cannot roll
a page back.

Where that memory is. Without a kit (tests, tools) it is anonymous memory, and the key is read
from the kernel's random source straight into a DONTDUMP page that is zeroed and unmapped once
the AEAD context (which keeps its own copy, inside OpenSSL) is built: nothing written is
readable after the process ends. In a shard it is the kit memfd `secrets.T`
(tierswap/kitstate.py): key, nonce reservation, counters and tags, so that a replacement
process adopts them and reads every block its predecessor sealed. The key then lives in that
memfd and the AEAD context only (never in a Python bytes object, never on disk): it dies
with the last process holding the kit, i.e. with the device or the host.

Nonces across a crash. The next counter is not kept in the memfd: a *reservation* is. Before a
seal uses counters beyond the reservation, the reservation is moved RESERVE_AHEAD counters
past them, in the memfd (write-ahead); an adopting process starts at the reservation. So a
counter is never used twice under one key, whatever instant the process died at, and a crash
skips at most RESERVE_AHEAD counters of 2^64.

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
import hashlib
import mmap
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from tierswap.kit import Kit

BLOCK = 4096
TAG = 16
KEY_BYTES = 32
_NONCE = struct.Struct(">IQ")
_AD = struct.Struct(">QI")
_KEY_AT, _RESERVED_AT = 0, 32  # in the first page of a kit buffer
RESERVE_AHEAD = 4096  # nonce counters reserved at a time (skipped, at most, by a crash)


class AuthenticationError(Exception):
    """A block did not authenticate: tampered, corrupted, stale, or never sealed here."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"block at tier offset {offset} failed authentication")
        self.offset = offset


class TagStore:
    """Nonce counter and tag of each block, in memory that is faulted in only where written.

    The one owner of the sealing state: BlockSealer reads and writes it only through these
    calls. Either anonymous memory of its own or laid over `buffer` (`nbytes(nblocks)` bytes of
    a kit memfd, which outlives the process): counters from offset 0, tags from the next page
    boundary after them. Counter 0 means "never sealed"."""

    def __init__(self, nblocks: int, buffer: memoryview | None = None) -> None:
        self.nblocks = nblocks
        self._ctr_map: mmap.mmap | None = None
        self._tag_map: mmap.mmap | None = None
        if buffer is None:
            from tierswap.hardening import dontdump

            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            page = mmap.PAGESIZE
            self._ctr_map = mmap.mmap(-1, max(nblocks * 8, page), flags=flags)  # not populated
            self._tag_map = mmap.mmap(-1, max(nblocks * TAG, page), flags=flags)
            for m in (self._ctr_map, self._tag_map):
                dontdump(m)
            self.ctr = np.frombuffer(self._ctr_map, np.uint64, count=nblocks)
            self._tags = memoryview(self._tag_map)
        else:
            if len(buffer) < self.nbytes(nblocks):
                raise ValueError("tag buffer too small for the tier")
            at = _page_align(nblocks * 8)
            self.ctr = np.frombuffer(buffer, np.uint64, nblocks, 0)
            self._tags = buffer[at : at + nblocks * TAG]

    @staticmethod
    def nbytes(nblocks: int) -> int:
        """Bytes of a buffer holding the counters and tags of `nblocks` blocks."""
        return _page_align(nblocks * 8) + _page_align(nblocks * TAG)

    def get(self, a: int, b: int) -> tuple[list[int], bytes]:
        """Counters and tags of blocks [a, b)."""
        return self.ctr[a:b].tolist(), bytes(self._tags[a * TAG : b * TAG])

    def set(self, block: int, ctr: int, tag: bytes | memoryview) -> None:
        self._tags[block * TAG : (block + 1) * TAG] = tag
        self.ctr[block] = ctr

    def clear(self, a: int, b: int) -> None:
        """Blocks [a, b) hold nothing any more."""
        self.ctr[a:b] = 0

    def counter(self, block: int) -> int:
        return int(self.ctr[block])

    def last_set(self, a: int, b: int) -> int | None:
        """Index of the highest sealed block in [a, b), or None."""
        nz = np.flatnonzero(self.ctr[a:b])
        return a + int(nz[-1]) if len(nz) else None

    def close(self) -> None:
        del self.ctr
        self._tags.release()
        for m in (self._ctr_map, self._tag_map):
            if m is not None:
                m.close()


def _page_align(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def random_into(buf: memoryview) -> None:
    """Fill `buf` from the kernel's random source, with no intermediate Python object."""
    fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = 0
        while got < len(buf):
            n = os.readv(fd, [buf[got:]])
            if n <= 0:
                raise OSError(errno.EIO, "short read from /dev/urandom")
            got += n
    finally:
        os.close(fd)


def _new_aead(key: bytes | None) -> AESGCM:
    """AES-256-GCM under `key`, or under a fresh random key that no Python object keeps."""
    if key is not None:
        return AESGCM(key)
    from tierswap.hardening import dontdump

    buf = mmap.mmap(-1, mmap.PAGESIZE)
    dontdump(buf)
    mv = memoryview(buf)
    k = mv[:KEY_BYTES]
    try:
        random_into(k)
        return AESGCM(k)  # copies the key into its OpenSSL context
    finally:
        k[:] = bytes(KEY_BYTES)
        k.release()
        mv.release()
        buf.close()


def padded(n: int) -> int:
    """Bytes a sealed piece of ``n`` bytes occupies: whole blocks."""
    return -(-n // BLOCK) * BLOCK


class BlockSealer:
    """AES-256-GCM over fixed 4 KiB blocks of one tier instance's address space.

    Synchronous and not thread-safe: called on the trio thread only (a 4 KiB block seals in
    about a microsecond, so there is nothing to gain from a worker thread).
    """

    def __init__(self, capacity: int, context: bytes, *, key: bytes | None = None,
                 buffer: memoryview | None = None, fresh: bool = True) -> None:
        """Sealing state in memory of its own, or laid over `buffer` (`nbytes(capacity)` bytes
        of a kit memfd, zero when ``fresh``): ``fresh`` makes a new key there (or puts `key`
        there: tests), otherwise the key, reservation, counters and tags it holds are
        adopted."""
        if capacity % BLOCK:
            raise ValueError("capacity must be a whole number of blocks")
        self.nblocks = capacity // BLOCK
        self._context = bytes(context)
        if buffer is None:
            self._aead = _new_aead(key)
            self.tags = TagStore(self.nblocks)
            self._reserved = np.ones(1, np.uint64)  # dies with the key: nothing to continue
        else:
            mv = memoryview(buffer).cast("B")
            if len(mv) < self.nbytes(capacity):
                raise ValueError("secrets buffer too small for the tier")
            k = mv[_KEY_AT : _KEY_AT + KEY_BYTES]
            try:
                if fresh and key is not None:
                    k[:] = key
                elif fresh:
                    random_into(k)
                self._aead = AESGCM(k)  # copies the key; the memfd keeps the only other copy
            finally:
                k.release()
            self._reserved = np.frombuffer(mv, np.uint64, 1, _RESERVED_AT)
            if fresh:
                self._reserved[0] = 1
            self.tags = TagStore(self.nblocks, mv[mmap.PAGESIZE :])
        self._next = int(self._reserved[0])  # an adopter starts after every counter reserved
        self._scratch = bytearray(BLOCK + TAG)
        self.auth_failures = 0  # counted by `read`; tiers that open directly count themselves
        self.sealed_blocks = 0
        self.adopted = buffer is not None and not fresh

    @staticmethod
    def nbytes(capacity: int) -> int:
        """Bytes of a kit buffer for a tier of `capacity` bytes: a page for the key and the
        nonce reservation, then the TagStore."""
        return mmap.PAGESIZE + TagStore.nbytes(capacity // BLOCK)

    @classmethod
    def for_tier(cls, kind: str, name: str, shard: int, capacity: int,
                 kit: Kit | None = None, index: int = 0,
                 adopt: bool | None = None) -> BlockSealer:
        """The sealer of tier `index`: in the kit's `secrets.<index>` when there is a kit
        (adopted if it holds this tier's secrets; `adopt` as in kitstate.claim)."""
        context = f"tierswap/{kind}/{name}/shard{shard}".encode()
        if kit is None:
            return cls(capacity, context)
        from tierswap.kitstate import claim

        ident = f"blocksealer/1/{capacity}/{hashlib.sha256(context).hexdigest()}"
        region = claim(kit, f"secrets.{index}", cls.nbytes(capacity), ident, adopt=adopt)
        sealer = cls(capacity, context, buffer=region.payload, fresh=not region.adopted)
        region.commit()
        return sealer

    def take_counters(self, n: int) -> int:
        """`n` consecutive nonce counters; returns the first. The reservation moves past them
        (in the memfd, with a kit) before they are returned: see the module docstring."""
        first = self._next
        end = first + n
        if end > int(self._reserved[0]):
            self._reserved[0] = end + RESERVE_AHEAD
        self._next = end
        return first

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
        ctr0 = self.take_counters(total // BLOCK)
        for i in range(total // BLOCK):
            if i < full:
                plain: bytes | memoryview = src[i * BLOCK : (i + 1) * BLOCK]
            else:  # the last, partial block: zero padding is sealed with it
                plain = bytes(src[i * BLOCK :]) + bytes(total - n)
            blk = first + i
            ctr = ctr0 + i
            at = i * BLOCK
            self._aead.encrypt_into(_NONCE.pack(0, ctr), plain, self._ad(blk),
                                    mv[at : at + BLOCK + TAG])
            self.tags.set(blk, ctr, mv[at + BLOCK : at + BLOCK + TAG])
        self.sealed_blocks += total // BLOCK
        return mv[:total]

    def forget(self, base: int, length: int) -> None:
        """Whole blocks inside [base, base+length) no longer hold anything (trimmed)."""
        a = -(-base // BLOCK)
        b = (base + length) // BLOCK
        if a < b:
            self.tags.clear(a, b)

    # ---------------------------------------------------------------- reading

    @staticmethod
    def span(base: int, length: int) -> tuple[int, int]:
        """The block-aligned extent [start, end) that holds [base, base+length)."""
        return base - base % BLOCK, padded(base + length)

    def snapshot(self, start: int, end: int) -> tuple[list[int], bytes]:
        """Counters and tags of blocks [start, end), taken before a read's first await."""
        return self.tags.get(start // BLOCK, end // BLOCK)

    def is_sealed(self, offset: int) -> bool:
        return self.tags.counter(offset // BLOCK) != 0

    def sealed_bytes(self, span: int) -> np.ndarray:
        """Bytes sealed in each `span`-sized stretch of the tier (e.g. per segment); reads
        only the counters that were ever written (a kit's memfd stays sparse)."""
        from tierswap.kitstate import count_nonzero_rows

        return count_nonzero_rows(self.tags.ctr.reshape(-1, span // BLOCK)) * BLOCK

    def last_sealed(self, start: int, end: int) -> int | None:
        """Offset of the highest sealed block in [start, end), or None."""
        i = self.tags.last_set(start // BLOCK, end // BLOCK)
        return None if i is None else i * BLOCK

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
