"""The kernel side: loop devices, mkswap, swapon/swapoff, FUSE mounts and their cleanup.

Everything shells out to util-linux, as an operator would, with a timeout, and turns failures
into `CommandError` with one line of text. Teardown functions never raise for "already gone".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tierswap.errors import CommandError


def run(argv: list[str], timeout: float = 60.0, check: bool = True,
        env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise CommandError(f"{' '.join(argv)}: {err[-1] if err else f'exit {p.returncode}'}")
    return p.stdout


# ---------------------------------------------------------------------------- loop devices


def loop_attach(path: Path) -> str:
    """Attach with direct I/O: requests reach the daemon without a second page cache."""
    dev = run(["losetup", "--find", "--show", "--direct-io=on", str(path)]).strip()
    # Writeback throttling would make reclaim wait on our queue's latency; the daemon
    # already bounds what it takes in flight, so switch it off (best effort).
    with contextlib.suppress(OSError):
        Path(f"/sys/block/{Path(dev).name}/queue/wbt_lat_usec").write_text("0")
    return dev


def loop_list() -> list[dict[str, str]]:
    """Every loop device: name, back-file, back-maj:min.

    losetup pads BACK-MAJ:MIN to its column width even in JSON ("     0:52  "); the values
    are stripped here, once, so that every comparison with a device number read elsewhere
    (mountinfo, the state file) and abort_fuse's "0:" test see the number itself.
    """
    try:
        out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,BACK-MAJ:MIN"],
                  check=False)
        devs = json.loads(out).get("loopdevices", []) if out.strip() else []
    except (CommandError, ValueError):
        return []
    return [{k: v.strip() if k == "back-maj:min" and isinstance(v, str) else v
             for k, v in d.items()} for d in devs if isinstance(d, dict)]


def loop_backing_dev(dev: str) -> str | None:
    for d in loop_list():
        if d["name"] == dev:
            return d.get("back-maj:min")
    return None


def loop_detach(dev: str) -> None:
    run(["losetup", "--detach", dev], check=False)


def loops_backed_by(prefix: Path, known: dict[str, str] | None = None) -> list[str]:
    """Loop devices whose backing file lies under `prefix`, or that match `known`
    ({loop: backing major:minor}, from the state file: after a lazy unmount the backing path
    no longer shows the mount, but the device number still identifies our FUSE file)."""
    pre = str(prefix).rstrip("/") + "/"
    known = known or {}
    return [d["name"] for d in loop_list()
            if (d.get("back-file") or "").startswith(pre)
            or (d["name"] in known and d.get("back-maj:min") == known[d["name"]])]


# ---------------------------------------------------------------------------- swap


def mkswap(dev: str) -> None:
    run(["mkswap", "--label", "tierswap", dev])


def swapon(dev: str, priority: int, flags: tuple[str, ...] = ("--discard",)) -> None:
    """`flags` come from device.swapon_options (config.parse_swapon_options)."""
    run(["swapon", *flags, "--priority", str(priority), dev])


def active_swaps() -> dict[str, dict[str, Any]]:
    """Every active swap area as /proc/swaps lists it (readable by anyone, root or not):
    {name: {"type": "partition" | "file", "size": bytes, "used": bytes, "priority": N}}."""
    out: dict[str, dict[str, Any]] = {}
    with open("/proc/swaps") as f:
        next(f)
        for line in f:
            name, kind, size, used, prio = line.split()[:5]
            out[name] = {"type": kind, "size": int(size) * 1024, "used": int(used) * 1024,
                         "priority": int(prio)}
    return out


# swapoff(2) answers EINVAL for a device that /proc/swaps still lists when another swapoff of
# it is under way: the first one took it off the list of writable swap areas, which is where
# the second looks. In the C locale swapoff(8) prints that errno as this text.
_SWAPOFF_BUSY = "Invalid argument"


def swapoff(dev: str, timeout: float = 3600.0, poll: float = 0.25) -> None:
    """Pull every page back into memory; can take long and needs RAM for all of them.

    Returns when ``dev`` is out of /proc/swaps, whoever took it out. One signal reaches the
    supervisor and every shard at once (a stop, the unit's watchdog), so two swapoffs of one
    device race; the one that comes second fails at once with EINVAL while the first pulls
    pages back. That is not a failure to report (a shard that believed it would serve on,
    with nobody left to stop it): wait for the first. If that one fails, the device is
    writable swap again and this one retries it. Raises CommandError when the device stays in
    swap (ENOMEM, EINTR, ...) or ``timeout`` runs out.
    """
    deadline = time.monotonic() + timeout
    while dev in active_swaps():
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandError(f"swapoff {dev}: another swapoff of it still runs after "
                               f"{timeout:.0f}s")
        try:
            run(["swapoff", dev], timeout=left, env={**os.environ, "LC_ALL": "C"})
            return
        except CommandError as e:
            if dev not in active_swaps():
                return  # the other swapoff finished between ours and this check
            if not str(e).endswith(_SWAPOFF_BUSY):
                raise
        time.sleep(poll)


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


def mount_device(mountpoint: str) -> str | None:
    """The major:minor of the file system mounted at `mountpoint` (from mountinfo, so no
    request reaches that file system)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[2]  # the last one is on top
    return found


def fuse_connection(mountpoint: str) -> str | None:
    """The /sys/fs/fuse/connections entry of a mount (its device number)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                return str(int(fields[2].split(":")[1]))
    return None


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_fuse(mountpoint: str | None = None, majmin: str | None = None) -> bool:
    """Fail all pending and future requests of a FUSE connection (last resort: a dead or
    wedged daemon under an active swap device). Found by mountpoint, or by the device number
    of the file system (which outlives a lazy unmount)."""
    conn = fuse_connection(mountpoint) if mountpoint else None
    if conn is None and majmin and majmin.startswith("0:"):
        conn = majmin.split(":")[1]
    if conn is None:
        return False
    mounted_here = not any(FUSECTL.iterdir())
    if mounted_here:  # systemd mounts fusectl at boot; elsewhere it may be missing
        run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False)
    try:
        (FUSECTL / conn / "abort").write_text("1")
        return True
    except OSError:
        return False
    finally:
        if mounted_here:  # leave the machine as we found it
            run(["umount", str(FUSECTL)], check=False)


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
