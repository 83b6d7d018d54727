"""What passes from one supervisor to the next: the shards, their kits and swap, never off.

Three ways a supervisor ends without tearing swap down, and the next one's side of each:

- `tierswap restart` (`hand_over`): this supervisor starts one running the code installed now
  (TIERSWAP_TAKEOVER), which adopts every live shard (`check_takeover`, `adopt`), reports
  READY and then replaces the shards one by one (`replace_shards`); this one exits.
- `systemctl restart` (`park`): every shard hands off with no successor yet and this
  supervisor exits; systemd's fd store (tierswap/fdstore.py) holds every kit and passes it to
  the next start, which starts every shard from it (`inherit`, `restore`).
- a supervisor that died and left its shards serving: the next `up` adopts them (`inherit`,
  `adopt`).

Limits: a restart needs every shard serving (a shard left behind would keep a kit only the
old supervisor holds); a park needs every kit in the fd store and kits that fit the
configuration the next start reads; a takeover owns nothing until it reported READY, so its
failure leaves the old supervisor as it was. Everything else of a supervisor's life (fresh
bring-up, keeping kits, watching and respawning shards, tear-down) is supervisor.py's; these
functions take the `Supervisor` and work on its state, on its trio thread, as its methods did.
Their log lines are the supervisor's and are logged as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import trio

from tierswap import commands, fdstore, system
from tierswap.cleanup import adoptable_shards, clear_shards, read_state
from tierswap.config import load_config
from tierswap.control import acall
from tierswap.errors import ControlError, StartError, TierswapError
from tierswap.fdstore import sd_notify
from tierswap.kit import KitError, check_manifest
from tierswap.procs import Pidfd, ProcessId
from tierswap.slot import FAILED, RESTARTING, SERVING, STOP_TIMEOUT

if TYPE_CHECKING:
    from tierswap.slot import ShardSlot
    from tierswap.supervisor import Supervisor

log = logging.getLogger("tierswap.supervisor")

RESTART_TIMEOUT = 120.0  # a new supervisor must have taken the shards over within this


# ---------------------------------------------------------------------------- what a start inherits


def check_takeover(sup: Supervisor, running: ProcessId | None) -> None:
    """Preflight of a supervisor started by `tierswap restart`: the shards are handed over to
    it, so every one must answer, or nothing is taken over and the old one serves on."""
    cfg = sup.config
    if running is None:
        raise StartError("the supervisor to take over is gone")
    sup.adopting = set(adoptable_shards(cfg, takeover=True))
    missing = sorted(set(range(cfg.shards)) - sup.adopting)
    if missing:
        raise StartError(f"shard(s) {', '.join(map(str, missing))} do not answer: "
                         "nothing taken over, the running supervisor keeps serving")


def inherit(sup: Supervisor) -> bool:
    """Preflight of any other start: whether it continues from a previous supervisor, by
    adopting the shards a dead one left serving or by restoring the kits systemd passed back;
    False if there is nothing to continue from (kits passed back are then dropped)."""
    cfg = sup.config
    listened = fdstore.listen_fds()
    restored = fdstore.rebuild(listened) if listened else None
    # with kits passed back, nobody may serve our devices yet: no /proc scan (cleanup.py)
    scan = restored is None or not restored.kits
    sup.adopting = set(adoptable_shards(cfg, scan=scan))
    if sup.adopting:
        # A supervisor died and left shards serving: take them over (issue 10). Anything
        # else of that run (a shard that died with it) is cleared shard by shard.
        log.warning("taking over shards %s of a supervisor that is gone",
                    ", ".join(map(str, sorted(sup.adopting))))
        if restored is not None:  # the live shards' kits are what counts
            restored.close()
            sup.fdstore.adopt(restored)
        clear_shards(cfg, keep=sup.adopting, scan=scan)
        return True
    if restored is not None and _restorable(sup, restored):
        # systemd restarted the unit (or it crashed) and passed the kits back: every
        # process is gone, the devices are still in swap, the connections alive
        sup.restoring = restored
        sup.fdstore.adopt(restored)
        log.warning("restoring shards %s from the fd store (swap stayed on)",
                    ", ".join(map(str, sorted(restored.kits))))
        clear_shards(cfg, keep=set(restored.kits), scan=False)  # what cannot be restored
        return True
    if restored is not None:
        sup.fdstore.adopt(restored)  # nothing usable: remove it from the store
    return False


def _restorable(sup: Supervisor, restored: fdstore.Restored) -> bool:
    """Whether kits passed back by systemd can be restored (some can); see fdstore."""
    try:
        fdstore.check_restorable(restored, sup.config)
    except KitError as e:
        raise StartError(f"{e}; swap stays on, nothing cleared") from None
    for k, why in sorted(restored.problems.items()):
        log.error("shard %d cannot be restored from the fd store: %s", k, why)
    for line in fdstore.stop_leftovers(sup.config, restored.kits):
        log.warning("%s", line)
    return bool(restored.kits)


# ---------------------------------------------------------------------------- taking over


async def adopt(sup: Supervisor) -> None:
    """Take over the shards a dead supervisor left serving: their processes (watched by
    pidfd: they are not our children), their devices (from state.json), their kits."""
    st = read_state(sup.config)
    recs = {r.get("shard"): r for r in st.get("shards", []) if isinstance(r, dict)}
    for slot in sup.slots:
        rec = recs.get(slot.index)
        ident = ProcessId.from_record(rec) if slot.index in sup.adopting else None
        pidfd = Pidfd.open(ident, config_path=sup.config_path) if ident else None
        if rec is None or pidfd is None:
            slot.state, slot.reason = FAILED, "died with the supervisor (no kit to restart)"
            continue
        slot.ident, slot.pidfd, slot.proc = pidfd.ident, pidfd, None
        slot.device, slot.backing = rec.get("loop"), rec.get("backing")
        slot.exited = trio.Event()
        await sup._deposit(slot)
        slot.state = SERVING
        assert sup._outer is not None
        sup._outer.start_soon(sup._watch, slot, pidfd, None)
        log.info("shard %d (pid %d) adopted, serving %s", slot.index, slot.pid,
                 slot.device or "no device")
    sup.active = any(s.device for s in sup.slots)
    sup._write_state()


async def restore(sup: Supervisor) -> None:
    """Start every shard from the kit systemd passed back (its processes are gone; its
    device, connection, map and arenas are not): the respawn path, for every shard at
    once. A shard without a usable kit was cleared in preflight and starts afresh."""
    assert sup.restoring is not None
    st = read_state(sup.config)
    recs = {r.get("shard"): r for r in st.get("shards", []) if isinstance(r, dict)}
    for slot in sup.slots:
        kit = sup.restoring.kits.pop(slot.index, None)
        if kit is None:
            continue
        rec = recs[slot.index]
        slot.device, slot.backing, slot.kit = rec["loop"], rec.get("backing"), kit
        await trio.to_thread.run_sync(sup.keeper.deposit, slot.index, kit)
        slot.state = RESTARTING
    sup.active = True
    sup._write_state()
    for slot in sup.slots:
        if slot.state != RESTARTING:
            await _fresh(sup, slot)
        elif await sup.respawn(slot):
            slot.state, slot.reason = SERVING, None
            log.info("shard %d restored (pid %s), serving %s", slot.index, slot.pid,
                     slot.device)
        else:
            sup._failed_with_kit(slot, "not restored from the fd store")
        sup._write_state()
    sup._write_session()


async def _fresh(sup: Supervisor, slot: ShardSlot) -> None:
    """Bring one shard up from nothing (mount, loop, mkswap, swapon), as `bring_up`."""
    await sup._spawn(slot)
    assert slot.proc is not None
    await sup._wait_mounted(slot.index, slot.proc)
    await sup._deposit(slot)
    slot.state = SERVING
    slot.device = await trio.to_thread.run_sync(system.loop_attach, slot.paths.swap_file)
    slot.backing = system.mount_device(str(slot.paths.mountpoint))
    sup._write_state()
    await trio.to_thread.run_sync(system.mkswap, slot.device)
    await trio.to_thread.run_sync(system.swapon, slot.device, sup.config.priority,
                                  sup.config.swapon_flags)


# ---------------------------------------------------------------------------- handing over


async def hand_over(sup: Supervisor, config_path: str | None = None) -> dict[str, Any]:
    """`tierswap restart`: start a supervisor running the code installed now, let it take
    the shards over (their kits, their processes), and exit without tearing anything down
    once it reports ready. It then replaces the shards one at a time. Swap stays on."""
    if sup.taking_over or sup.replacing:
        raise ControlError("a restart is already under way")
    if sup.shutdown.is_set():
        raise ControlError("stopping: no restart")
    for slot in sup.slots:
        if slot.state != SERVING or slot.pidfd is None:
            raise ControlError(f"shard {slot.index} is {slot.state}: a restart needs every "
                               "shard serving (its kit would stay behind)")
    sup.taking_over = True
    r, w = os.pipe()
    argv = [sys.executable, "-m", "tierswap", "up", "--foreground"]
    config_path = config_path or sup.config_path
    if config_path:
        argv += ["--config", config_path]
    env = dict(os.environ, TIERSWAP_READY_FD=str(w),
               TIERSWAP_TAKEOVER=sup.ident.format().strip())
    # stdout and stderr are this supervisor's own: the journal under the unit (with
    # JOURNAL_STREAM), the log file of a detached `up`; the new one logs where we did.
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, pass_fds=(w,),
                                start_new_session=True)
    finally:
        os.close(w)
    line = ""
    try:
        with trio.move_on_after(RESTART_TIMEOUT):
            line = await _read_line_fd(r)
    finally:
        os.close(r)
    if not line.startswith("READY"):
        sup.taking_over = False
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await trio.to_thread.run_sync(proc.wait)
        why = (line[6:] if line.startswith("ERROR") else
               f"it ended without a word (see {sup.layout.log_file})" if line == "" and
               proc.returncode != -signal.SIGKILL else "no word from it in time")
        raise ControlError(f"restart: the new supervisor did not take over: {why}")
    log.info("supervisor pid %d took over; this one exits, swap stays on", proc.pid)
    sd_notify(f"MAINPID={proc.pid}")  # under systemd the new one is the main process now
    sup.handed_over = True
    sup.shutdown.set()
    return {"supervisor": proc.pid}


async def _read_line_fd(fd: int) -> str:
    """One line from a pipe, waiting in trio (EOF: what there is)."""
    os.set_blocking(fd, False)
    buf = b""
    while b"\n" not in buf:
        await trio.lowlevel.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


async def replace_shards(sup: Supervisor) -> None:
    """After a takeover: each shard in turn hands its kit over and a process running the
    code installed now takes its place (the kernel holds its requests meanwhile)."""
    sup.replacing = True
    try:
        await _replace_shards(sup)
    finally:
        sup.replacing = False


async def _hand_off(slot: ShardSlot) -> Exception | None:
    """Ask one shard to hand its kit off (stop serving without swapoff or unmount) and wait
    for its process to exit; the error if it did not. `slot.handing_off` is left set: its
    exit is expected, and the caller decides what follows."""
    slot.handing_off = True
    try:
        await acall(slot.paths.control_socket, commands.Handoff().to_wire(), timeout=30)
        with trio.fail_after(STOP_TIMEOUT):
            await slot.exited.wait()
    except (ControlError, trio.TooSlowError) as e:
        return e
    return None


async def _replace_shards(sup: Supervisor) -> None:
    if sup.takeover is not None:
        old = Pidfd.open(sup.takeover)
        if old is not None:  # the supervisor we replaced exits once we reported ready
            with old, trio.move_on_after(STOP_TIMEOUT):
                await old.wait_exit()
    for slot in sup.slots:
        if slot.state != SERVING or slot.pidfd is None:
            continue
        err = await _hand_off(slot)
        slot.handing_off = False
        if err is not None:
            log.error("shard %d did not hand over (%s): left as it is", slot.index, err)
            continue
        slot.state = RESTARTING
        sup._write_state()
        if await sup.respawn(slot):
            slot.state, slot.reason = SERVING, None
            log.info("shard %d replaced (pid %s)", slot.index, slot.pid)
        else:
            sup._failed_with_kit(slot, "no replacement came up after a restart")
        sup._write_state()


async def park(sup: Supervisor) -> dict[str, Any]:
    """`systemctl restart` (ExecStop= `tierswap down --unless-restarting`): every shard
    stops serving without swapoff (a hand-off with no successor yet), then this supervisor
    exits without tear-down. Only with every kit in systemd's fd store, which passes them
    to the next start (`restore`); the kernel holds the requests meanwhile."""
    if sup.taking_over or sup.replacing or sup.shutdown.is_set():
        raise ControlError("park: a restart or a stop is already under way")
    for slot in sup.slots:
        if slot.state != SERVING or slot.pidfd is None:
            raise ControlError(f"park: shard {slot.index} is {slot.state}")
        if not sup._stored.get(slot.index):
            raise ControlError(f"park: shard {slot.index}'s kit is not (all) in the fd store")
    try:  # what the next start will read: it must find the kits fit (else no page back)
        upcoming = load_config(sup.config_path)
    except TierswapError as e:
        raise ControlError(f"park: the configuration the next start reads: {e}") from None
    for slot in sup.slots:
        try:
            check_manifest(slot.kit.manifest, upcoming, slot.index)
        except KitError as e:
            raise ControlError(f"park: shard {slot.index}: {e}; the next start could not "
                               "take its pages over") from None
    sup.taking_over = True  # a shard's exit from here on is expected
    for slot in sup.slots:
        err = await _hand_off(slot)
        if err is not None:
            # too late to go back for the shards already parked: kill it, the kit is stored
            log.error("shard %d did not hand over (%s): killed", slot.index, err)
            if slot.pidfd is not None:
                slot.pidfd.send_signal(signal.SIGKILL)
    log.warning("parked for a restart: every kit is in systemd's fd store, swap stays on")
    sup.handed_over = True
    sup.shutdown.set()
    return {"parked": [s.index for s in sup.slots]}
