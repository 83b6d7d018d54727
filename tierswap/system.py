"""The kernel side: loop devices, mkswap, swapon/swapoff, FUSE mounts and their cleanup.

Everything shells out to util-linux, as an operator would, with a timeout, and turns failures
into `SystemError_` with one line of text. Teardown functions never raise for "already gone".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path


class SystemError_(Exception):
    """A system command failed; the text is one line for the operator."""


def run(argv: list[str], timeout: float = 60.0, check: bool = True) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SystemError_(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise SystemError_(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise SystemError_(f"{' '.join(argv)}: {err[-1] if err else f'exit {p.returncode}'}")
    return p.stdout


# ---------------------------------------------------------------------------- loop devices


def loop_attach(path: Path) -> str:
    """Attach with direct I/O: requests reach the daemon without a second page cache."""
    return run(["losetup", "--find", "--show", "--direct-io=on", str(path)]).strip()


def loop_detach(dev: str) -> None:
    run(["losetup", "--detach", dev], check=False)


def loops_backed_by(prefix: Path) -> list[str]:
    """Loop devices whose backing file lies under `prefix` (for stale-state cleanup)."""
    try:
        out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False)
        devs = json.loads(out).get("loopdevices", []) if out.strip() else []
    except (SystemError_, ValueError):
        return []
    pre = str(prefix).rstrip("/") + "/"
    return [d["name"] for d in devs if (d.get("back-file") or "").startswith(pre)]


# ---------------------------------------------------------------------------- swap


def mkswap(dev: str) -> None:
    run(["mkswap", "--label", "tierswap", dev])


def swapon(dev: str, priority: int) -> None:
    run(["swapon", "--discard", "--priority", str(priority), dev])


def active_swaps() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with open("/proc/swaps") as f:
        next(f)
        for line in f:
            name, _type, size, used, prio = line.split()[:5]
            out[name] = {"size": int(size) * 1024, "used": int(used) * 1024, "priority": int(prio)}
    return out


def swapoff(dev: str, timeout: float = 3600.0) -> None:
    """Pull every page back into memory; can take long and needs RAM for all of them."""
    if dev in active_swaps():
        run(["swapoff", dev], timeout=timeout)


# ---------------------------------------------------------------------------- mounts


def fuse_mounts_under(prefix: Path) -> list[str]:
    pre = str(prefix).rstrip("/") + "/"
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            if fields[2].startswith("fuse") and (mnt + "/").startswith(pre):
                out.append(mnt)
    return out


def fuse_connection(mountpoint: str) -> str | None:
    """The /sys/fs/fuse/connections entry of a mount (its device number)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                return str(int(fields[2].split(":")[1]))
    return None


def abort_fuse(mountpoint: str) -> None:
    """Fail all pending and future requests of a hung FUSE connection (last resort)."""
    conn = fuse_connection(mountpoint)
    if conn is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{conn}/abort").write_text("1")


def lazy_unmount(mountpoint: str) -> None:
    run(["umount", "-l", mountpoint], check=False)


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
