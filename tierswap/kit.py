"""A shard's kit: every file descriptor whose loss would cost pages.

    fuse          the FUSE session fd pyfuse3 mounted with (the connection itself)
    fuse.N        one cloned /dev/fuse fd per lane thread (a reply must go to the fd that read
                  the request, so these must outlive a crash too: see docs/design.md)
    map           memfd: the LMDB slot map
    arena.T       memfd: the RAM arena of memory tier T (its size is what has been grown)
    life.T        memfd: tier T's per-segment life counters (uint32 each)
    secrets.T     memfd: key, nonce reservation, counters and tags of a sealed tier T
                  (crypto.py, tiers/ecseal.py)
    state.T       memfd: a store's own state that must survive (remote placement, bitmaps;
                  tierswap/kitstate.py gives both a header naming what they hold)

Everything is memory: memfds live as long as some process holds them, never touch a disk, and
disappear with the host. A shard makes its kit at first start; once it serves, the supervisor
fetches the kit (SCM_RIGHTS over the shard's control socket), which keeps every memfd mapped and
locked, so that neither the shard's death nor memory pressure in the gap before its
replacement can lose or swap those pages. A respawned shard gets the same fds (pass_fds) and a
manifest naming them.

Limits: memfds are sized once (maps, life, secrets, state) or grown by the owner only (arenas);
the kit holds at most MAX_FDS descriptors (SCM_RIGHTS carries 253 per message).
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tierswap.errors import StartError

MAX_FDS = 200
MFD_FLAGS = os.MFD_CLOEXEC | getattr(os, "MFD_NOEXEC_SEAL", 0)


class KitError(StartError):
    """A kit that does not fit the shard it is offered to: a start error (one line for the
    operator, e.g. from `restart` with a configuration that changed the device's layout)."""


@dataclass
class Kit:
    fds: dict[str, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True  # made by this process (not inherited from a dead one)
    _maps: dict[str, mmap.mmap] = field(default_factory=dict)

    # ------------------------------------------------------------------ memfds

    def memfd(self, name: str, size: int | None = None) -> int:
        """The memfd `name`, created (with `size` bytes, sparse) if the kit has none yet."""
        fd = self.fds.get(name)
        if fd is None:
            fd = os.memfd_create(f"tierswap:{name}", MFD_FLAGS)
            if size:
                os.ftruncate(fd, size)
            self.fds[name] = fd
        elif size is not None and os.fstat(fd).st_size < size:
            raise KitError(f"kit memfd {name} is smaller than this configuration needs")
        return fd

    def mapped(self, name: str, size: int) -> mmap.mmap:
        """A shared mapping of memfd `name` (created if needed), kept for the kit's life."""
        m = self._maps.get(name)
        if m is None:
            fd = self.memfd(name, size)
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            _dontdump(m)
            self._maps[name] = m
        return m

    def has(self, name: str) -> bool:
        return name in self.fds

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(BufferError):  # still exported to a numpy view: ending
                m.close()
        self._maps.clear()
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    # ------------------------------------------------------------------ passing it on

    def names(self) -> list[str]:
        return sorted(self.fds)

    def describe(self) -> str:
        """The manifest and the fd names, as one JSON text (no fd numbers, no content)."""
        return json.dumps({"manifest": self.manifest, "names": self.names()})

    def env(self) -> dict[str, str]:
        """What a child started with pass_fds=self.fds.values() needs to rebuild the kit."""
        return {"TIERSWAP_KIT": json.dumps({"manifest": self.manifest, "fds": self.fds})}

    @classmethod
    def from_env(cls, value: str) -> Kit:
        try:
            d = json.loads(value)
            fds = {str(k): int(v) for k, v in d["fds"].items()}
            manifest = dict(d["manifest"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KitError("TIERSWAP_KIT is not a kit description") from None
        for name, fd in fds.items():
            try:
                os.fstat(fd)
            except OSError:
                raise KitError(f"kit fd {name} ({fd}) is not open") from None
            os.set_inheritable(fd, False)
        return cls(fds=fds, manifest=manifest, fresh=False)


def _dontdump(m: mmap.mmap) -> None:
    madv = getattr(mmap, "MADV_DONTDUMP", 16)
    with contextlib.suppress(OSError, ValueError):
        m.madvise(madv)


# ---------------------------------------------------------------------- manifest

KIT_VERSION = 1


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _geometry(config: Any, shard: int) -> dict[str, Any]:
    return {"shard": shard, "shards": config.shards, "size": config.size,
            "tiers": [[t.name, t.kind, t.capacity] for t in config.tiers]}


def make_manifest(config: Any, shard: int, lane_threads: int) -> dict[str, Any]:
    return {"version": KIT_VERSION, "boot_id": boot_id(), "lane_threads": lane_threads,
            **_geometry(config, shard)}


def check_manifest(manifest: dict[str, Any], config: Any, shard: int) -> None:
    """A kit fits a shard only with the same geometry (size, tiers and their capacities):
    policy, metrics and the like may change across a restart, where a page lives may not."""
    if manifest.get("version") != KIT_VERSION:
        raise KitError(f"kit version {manifest.get('version')!r} is not {KIT_VERSION}")
    if manifest.get("boot_id") != boot_id():
        raise KitError("the kit is from another boot")
    want = _geometry(config, shard)
    for key, value in want.items():
        if manifest.get(key) != value:
            raise KitError(f"the running device has {key} = {manifest.get(key)!r}; this "
                           f"configuration says {value!r} (change it only with a stop)")


# ---------------------------------------------------------------------- SCM_RIGHTS


def send_fds(sock: socket.socket, header: dict[str, Any], fds: Iterable[int]) -> None:
    """One message: a JSON header line, with the fds attached (in the order of header['names'])."""
    fd_list = list(fds)
    if len(fd_list) > MAX_FDS:
        raise KitError(f"a kit holds at most {MAX_FDS} fds")
    data = json.dumps(header).encode() + b"\n"
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))])


def recv_fds(sock: socket.socket, maxlen: int = 65536) -> tuple[dict[str, Any], list[int]]:
    msg, anc, flags, _addr = sock.recvmsg(maxlen, socket.CMSG_SPACE(MAX_FDS * 4))
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    got = list(fds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in got:
            os.close(fd)
        raise KitError("kit message truncated")
    for fd in got:
        os.set_inheritable(fd, False)
    try:
        header = json.loads(msg.split(b"\n", 1)[0])
    except ValueError:
        for fd in got:
            os.close(fd)
        raise KitError("kit message is not JSON") from None
    return header, got


# ---------------------------------------------------------------------- fetching a kit


def fetch_kit(path: os.PathLike[str] | str, timeout: float = 10.0) -> Kit:
    """Ask a shard's control socket for its kit (blocking: call it in a worker thread)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        s.sendall(b'{"cmd":"kit"}\n')
        header, fds = recv_fds(s)
    except OSError as e:
        raise KitError(f"{path}: cannot fetch the kit: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        if not header.get("ok"):
            raise KitError(f"{path}: {header.get('error', 'kit refused')}")
        result = header["result"]
        names = list(result["names"])
        if len(names) != len(fds):
            raise KitError(f"{path}: the kit names {len(names)} fds but carries {len(fds)}")
        return Kit(fds=dict(zip(names, fds, strict=True)), manifest=dict(result["manifest"]),
                   fresh=False)
    except (KeyError, TypeError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        raise KitError(f"{path}: not a kit reply ({e})") from None
    except KitError:
        for fd in fds:
            os.close(fd)
        raise


@dataclass
class FdReply:
    """A control reply that carries file descriptors (the shard's answer to "kit")."""

    result: Any
    fds: list[int]
