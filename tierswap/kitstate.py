"""Store state that outlives the shard process: regions of kit memfds (issue 10).

A store whose state must survive a crash of its shard (sealing keys, nonce counters and tags;
remote placement and per-segment bitmaps) keeps it in a memfd of the shard's kit
(tierswap/kit.py: `secrets.T`, `state.T`) instead of in Python objects, and works on it in
place through numpy views, so that every change is in the memfd the moment it is made: there
is no save step a crash could skip. A replacement process adopts the memfd and finds the state
exactly as the dead one left it, down to its last store. What the owner must do is order its
stores so that any prefix of them is a state it can recover from (write-ahead), which is each
owner's business (crypto.py, tiers/erasure.py, tiers/remote.py).

Every such memfd has one shape:

    page 0    header: magic | SHA-256 of the owner's identity | committed flag
    page 1..  the owner's payload (arrays start on page boundaries: pages never touched stay
              unallocated, so a sparse table costs nothing until it is written)

The identity names what the payload is (owner, layout version, geometry, the tier's sealing
context): a replacement built for another layout or another tier refuses the memfd with a
KitError instead of misreading it. The committed flag is written last, once the owner has
initialised its payload; a memfd left uncommitted (its maker died while creating it, so it
never served a page from it) is wiped and started again.

Without a kit (unit tests, tools) a region is anonymous memory of the same shape, so the
owners have one code path; it dies with the process, as everything did before kits.

Sparse tables. A page of a memfd that was never written costs nothing, but unlike anonymous
memory, *reading* it allocates it (shmem has no shared zero page). A table meant to stay
sparse (sealing counters and tags: 24 bytes per 4 KiB of tier) is therefore never scanned
whole: `count_nonzero_rows` reads only the pages that are resident (mincore), which is where
anything was ever written, since these pages are locked (the shard's mlockall, the keeper).

Limits: a layout is fixed for the life of the memfd (the kit manifest fixes the geometry it
depends on, kit.check_manifest); changing a layout needs a stop. Regions are MADV_DONTDUMP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tierswap.hardening import dontdump
from tierswap.kit import KitError

if TYPE_CHECKING:
    from tierswap.kit import Kit

PAGE = 4096
MAGIC = b"tierswap-region\x01"
_HDR = struct.Struct("<16s32sQ")  # magic, identity digest, committed


def _align(n: int) -> int:
    return -(-n // PAGE) * PAGE


class Region:
    """A kit memfd (or anonymous memory) holding one owner's state; see the module docstring.

    `payload` is a writable view of the pages after the header; `adopted` says whether it holds
    a committed state made by an earlier process (else it is zero and the owner initialises it,
    then calls `commit`)."""

    def __init__(self, name: str, mapping: mmap.mmap, ident: str, adopted: bool) -> None:
        self.name = name
        self._map = mapping
        self._digest = hashlib.sha256(ident.encode()).digest()
        self.adopted = adopted
        self.payload = memoryview(mapping)[PAGE:]

    def commit(self) -> None:
        """The payload is initialised: from now on a replacement adopts it."""
        _HDR.pack_into(self._map, 0, MAGIC, self._digest, 1)

    @property
    def committed(self) -> bool:
        magic, digest, flag = _HDR.unpack_from(self._map, 0)
        return bool(magic == MAGIC and digest == self._digest and flag == 1)


def claim(kit: Kit | None, name: str, payload: int, ident: str, *,
          adopt: bool | None = None) -> Region:
    """Kit memfd `name` with `payload` bytes after its header, as a Region.

    ``adopt=None``: adopt a committed state of this identity, start afresh on a new or
    uncommitted memfd, refuse (KitError) one that holds anything else. ``adopt=False``: start
    afresh whatever it holds (the owner's companion region was not adopted). ``adopt=True``:
    a committed state of this identity or KitError.
    """
    size = PAGE + _align(max(payload, 1))
    if kit is None:
        if adopt:
            raise KitError(f"no kit to adopt {name} from")
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                      | getattr(mmap, "MAP_NORESERVE", 0x4000))
        dontdump(m)
        return Region(name, m, ident, False)
    existed = kit.has(name)
    m = kit.mapped(name, size)
    region = Region(name, m, ident, False)
    if not existed:
        if adopt:
            raise KitError(f"the kit has no {name} to adopt")
        return region
    magic, _digest, flag = _HDR.unpack_from(m, 0)
    if region.committed and adopt is not False:
        region.adopted = True
        return region
    if adopt:
        raise KitError(f"kit {name} holds no committed state to adopt")
    if flag and magic == MAGIC and adopt is None:
        raise KitError(f"kit {name} holds state of another layout or tier; this configuration "
                       f"or version cannot adopt it (change it only with a stop)")
    _wipe(m)
    return region


def _wipe(m: mmap.mmap) -> None:
    """Zero a shared mapping, giving its pages back (a hole in the memfd, not written zeros)."""
    try:
        m.madvise(getattr(mmap, "MADV_REMOVE", 9))
    except OSError:
        m[:] = bytes(len(m))


# ---------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class Field:
    """One array of a layout: its name, dtype, shape, and what a fresh state holds."""

    name: str
    dtype: Any
    shape: tuple[int, ...]
    fill: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


class Layout:
    """Named numpy arrays at fixed, page-aligned offsets of a region's payload."""

    def __init__(self, owner: str, fields: Sequence[Field]) -> None:
        self.owner = owner
        self.fields = list(fields)
        self.offsets: list[int] = []
        at = 0
        for f in self.fields:
            self.offsets.append(at)
            at += _align(f.nbytes)
        self.nbytes = at

    @property
    def ident(self) -> str:
        """What a memfd of this layout holds (part of the region identity)."""
        parts = [f"{f.name}:{np.dtype(f.dtype).str}:{'x'.join(map(str, f.shape))}"
                 for f in self.fields]
        return f"{self.owner}/" + ",".join(parts)

    def views(self, payload: memoryview, *, fresh: bool) -> dict[str, np.ndarray]:
        """The arrays over `payload`; a fresh state gets each field's fill value."""
        out: dict[str, np.ndarray] = {}
        for f, at in zip(self.fields, self.offsets, strict=True):
            count = int(np.prod(f.shape, dtype=np.int64))
            a = np.frombuffer(payload, f.dtype, count, at).reshape(f.shape)
            if fresh and f.fill:
                a[...] = f.fill
            out[f.name] = a
        return out

    def allocate(self) -> dict[str, np.ndarray]:
        """The arrays in ordinary memory (no kit)."""
        return {f.name: np.full(f.shape, f.fill, f.dtype) for f in self.fields}

    def open(self, kit: Kit | None, name: str, ident: str = "", *,
             adopt: bool | None = None) -> tuple[Region | None, dict[str, np.ndarray]]:
        """Arrays in kit memfd `name` (adopted if it holds them), or in ordinary memory
        without a kit. The caller commits the region once it has initialised the rest."""
        if kit is None:
            return None, self.allocate()
        region = claim(kit, name, self.nbytes, f"{self.ident}/{ident}", adopt=adopt)
        return region, self.views(region.payload, fresh=not region.adopted)


# ---------------------------------------------------------------------- sparse tables

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def count_nonzero_rows(a: np.ndarray) -> np.ndarray:
    """`np.count_nonzero(a, axis=-1)` of a C-contiguous array, reading only rows that touch a
    resident page (a row on pages never faulted in is all zero): scanning a sparse kit table
    this way does not allocate it (see the module docstring)."""
    flat = a.reshape(-1, a.shape[-1])
    rows = len(flat)
    out = np.zeros(rows, np.int64)
    if rows == 0 or flat.nbytes == 0:
        return out.reshape(a.shape[:-1])
    base = flat.ctypes.data
    start = base - base % PAGE
    span = base + flat.nbytes - start
    vec = np.zeros(-(-span // PAGE), np.uint8)
    if _libc.mincore(start, span, vec.ctypes.data) != 0:  # cannot tell: read it all
        return np.count_nonzero(a, axis=-1)
    seen = np.concatenate([[0], np.cumsum(vec & 1)])
    step = flat.strides[0]
    first = (base - start + np.arange(rows, dtype=np.int64) * step) // PAGE
    last = (base - start + np.arange(1, rows + 1, dtype=np.int64) * step - 1) // PAGE
    touched = seen[last + 1] - seen[first] > 0
    out[touched] = np.count_nonzero(flat[touched], axis=1)
    return out.reshape(a.shape[:-1])
