"""`tierswap` command line. Every failure is one line on stderr and a non-zero exit:
2 for bad usage or configuration, 1 for everything else; never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from tierswap import commands
from tierswap.config import format_size, load_config, make_private_dir, parse_size
from tierswap.control import call
from tierswap.errors import ConfigError, ControlError, StartError, TierswapError
from tierswap.layout import Layout

UP_TIMEOUT = 180.0
PING_TIMEOUT = 5.0


class UsageError(TierswapError):
    pass


class VersionAction(argparse.Action):
    """`--version`: tierswap's version and the pyfuse3 build, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print tierswap's version and the pyfuse3 build, then exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace, values,
                 option_string=None) -> NoReturn:
        from tierswap.build import version_text

        print(version_text())
        parser.exit()


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _config(args):
    return load_config(args.config)


def _log_tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


# ---------------------------------------------------------------------------- commands


def _plan(config) -> list[str]:
    """`up`'s plan and its warnings (tierswap.plan); our own devices (a restart's takeover)
    never count as another swap at the same priority."""
    from tierswap import plan, system
    from tierswap.metrics import LISTEN_REMOVED

    ours = set(system.loops_backed_by(config.run_dir))
    lines = plan.plan_lines(config)
    lines += plan.same_priority_swaps(config, system.active_swaps(), ours)
    if config.metrics.listen:
        lines.append(f"warning: {LISTEN_REMOVED}")
    return lines


def cmd_up(args) -> int:
    from tierswap.build import require_pyfuse3
    from tierswap.supervisor import supervise

    if args.foreground:
        fd = os.environ.pop("TIERSWAP_READY_FD", None)
        ready_fd = int(fd) if fd else None
        try:
            config = _config(args)
            require_pyfuse3()  # systemd's start: one line, nothing started
        except (ConfigError, StartError) as e:  # whoever waits on the ready pipe gets it too
            if ready_fd is not None:
                kind = "config error: " if isinstance(e, ConfigError) else ""
                with contextlib.suppress(OSError):
                    os.write(ready_fd, f"ERROR {kind}{e}\n".encode())
            raise
        import logging

        from tierswap.logs import setup_logging

        setup_logging()
        for line in _plan(config):  # under systemd: into the journal, before anything starts
            logging.getLogger("tierswap.up").log(
                logging.WARNING if line.startswith("warning:") else logging.INFO, "%s", line)
        return supervise(config, args.config, ready_fd)  # StartError: one line
    config = _config(args)
    require_pyfuse3()  # one line, before anything is created or started
    if os.geteuid() != 0:
        raise CliError("must run as root (swapon, losetup and FUSE mounts need it)")
    from tierswap.cleanup import running_supervisor

    running = running_supervisor(config)
    if running is not None:
        raise CliError(f"already running (pid {running.pid}); use 'tierswap down' first")
    # the plan on stderr, before anything is allocated; stdout stays the device list
    for line in _plan(config):
        print(f"tierswap: {line}", file=sys.stderr, flush=True)
    make_private_dir(config.run_dir)
    logfile = Layout.of(config).log_file
    r, w = os.pipe()
    argv = [sys.executable, "-m", "tierswap", "up", "--foreground"]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    env = dict(os.environ, TIERSWAP_READY_FD=str(w))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                            env=env, pass_fds=(w,), start_new_session=True)
    os.close(log_fd)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.readline().strip()  # EOF when the child dies without a word
    if line.startswith("READY"):
        devs = line.split()[1:]
        print("\n".join(devs))
        return 0
    try:
        proc.wait(timeout=UP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
    msg = line[6:] if line.startswith("ERROR") else _log_tail(logfile) or "failed to start"
    raise CliError(msg)


def cmd_down(args) -> int:
    config = _config(args)
    from tierswap.cleanup import config_path, force_cleanup, running_supervisor, stale_state
    from tierswap.procs import Pidfd

    if args.unless_restarting and _parked(args, config):
        return 0
    ident = running_supervisor(config)
    # pinned: whatever happens to the pid meanwhile, a signal reaches this process or nobody
    sup = Pidfd.open(ident, config_path=config_path(config)) if ident is not None else None
    if sup is not None:
        with sup:
            pid = sup.ident.pid
            try:
                # a supervisor that does not even answer a ping is wedged: no point waiting
                sock = Layout.of(config).control_socket
                call(sock, commands.Ping().to_wire(), timeout=PING_TIMEOUT)
                call(sock, commands.Down().to_wire(), timeout=args.timeout)
            except ControlError as e:
                if "swapoff failed" in str(e):
                    raise CliError(str(e)) from None
                if not args.force:
                    raise CliError(f"{e}; the supervisor (pid {pid}) does not answer: "
                                   "use 'tierswap down --force'") from None
                sup.send_signal(signal.SIGKILL)
            # swapoff pulls every page back: give it the time it needs
            if not sup.wait(args.timeout):
                raise CliError(f"still stopping after {args.timeout:.0f}s (pid {pid})")
    left = stale_state(config)
    if left and not args.force:
        raise CliError("left by a crashed run: " + "; ".join(left)
                       + " (use 'tierswap down --force')")
    if args.force:  # also removes stale state and pid files when nothing else is left
        for line in force_cleanup(config):
            print(line)
        left = stale_state(config)
        if left:
            raise CliError("could not clear: " + "; ".join(left))
    if sup is None and not args.quiet:
        print("tierswap is not running")
    return 0


def _parked(args, config) -> bool:
    """`down --unless-restarting` (the unit's ExecStop=, ExecStopPost=, ExecStartPre=): during
    `systemctl restart`, or between a crash and Restart=, with every kit in systemd's fd store,
    leave swap on: park a running supervisor (its shards exit without swapoff) and return
    True. Anything else (a stop job, no fd store, systemd not answering) is a normal down."""
    from tierswap.fdstore import restart_decision

    decision = restart_decision(config)
    if decision is None:
        return False
    keep, why = decision
    if not keep:
        if not args.quiet:
            print(why)
        return False
    from tierswap.cleanup import config_path, running_supervisor
    from tierswap.procs import Pidfd

    ident = running_supervisor(config)  # none after a crash (ExecStopPost=, ExecStartPre=)
    sup = Pidfd.open(ident, config_path=config_path(config)) if ident is not None else None
    if sup is not None:
        with sup:
            sock = Layout.of(config).control_socket
            try:  # each shard: up to 30 s to hand off and 30 s to exit
                call(sock, commands.Park().to_wire(), timeout=60.0 * config.shards + 30)
            except ControlError as e:
                if _all_serving(sock):  # refused before any shard stopped: a normal down
                    print(f"{why}; but the supervisor did not park ({e}): swapoff")
                    return False
                # Some shards may be parked already (no process): a swapoff of their devices
                # would never end. Their kits are in the store: keep swap on for the start.
                print(f"{why}; parking did not finish ({e}): swap stays on, the next start "
                      "restores the kits")
                return True
            sup.wait(60.0)  # it exits once its shards did (systemd then kills what is left)
    if not args.quiet:
        print(why)
    return True


def _all_serving(sock) -> bool:
    """The supervisor answers and every shard serves (nothing was parked)."""
    try:
        st = call(sock, commands.Status().to_wire(), timeout=10)
    except ControlError:
        return False
    shards = st.get("shards") if isinstance(st, dict) else None
    if not isinstance(shards, list) or not shards:
        return False
    return all(isinstance(r, dict) and r.get("state") == "serving" for r in shards)


def _request(args, req: commands.Request, timeout: float | None = 60.0, on_progress=None) -> Any:
    config = _config(args)
    try:
        return call(Layout.of(config).control_socket, req.to_wire(), timeout=timeout,
                    on_progress=on_progress)
    except ControlError as e:
        raise CliError(str(e)) from None


def _show(args, req: commands.Request, res: Any) -> int:
    """Print a result (JSON with --json); a shard's failure is the one line on stderr."""
    print(json.dumps(res, indent=2) if getattr(args, "json", False) else req.render(res))
    failed = commands.failures(res)
    if failed:
        raise CliError("; ".join(failed))
    return 0


STATUS_TIMEOUT = 5.0  # the supervisor answers within ~2 s (STATUS_SHARD_TIMEOUT) plus its own


def cmd_status(args) -> int:
    """The live record from the supervisor; when the control socket cannot be used (not root,
    or the supervisor does not answer within STATUS_TIMEOUT), the summary it last wrote
    (tierswap/summary.py) with /proc/swaps as it is now, and a note on stderr."""
    from tierswap import summary, system
    from tierswap.status import Style, overlay_swaps, parse_columns, render

    try:
        columns = parse_columns(args.output) if args.output is not None else None
    except ValueError as e:
        raise UsageError(f"--output: {e}") from None
    style = Style(bytes=args.bytes, raw=args.raw, headings=not args.noheadings)
    root = os.geteuid() == 0
    try:
        # a user who is not root cannot list the 0700 run directory that validation looks into
        layout = Layout.of(load_config(args.config, check_fs=root))
        sock, summary_file = layout.control_socket, layout.summary_file
    except PermissionError as e:  # the config is root's alone (/etc/tierswap is 0700)
        if root:
            raise
        sock, summary_file = None, summary.DEFAULT_FILE
        why = f"cannot read the config ({e.strerror}: {e.filename})"
    try:
        if sock is None:
            raise ControlError(why)
        res = call(sock, commands.Status().to_wire(), timeout=STATUS_TIMEOUT)
    except ControlError as e:
        try:
            res, age = summary.read(summary_file)
        except summary.SummaryError as no:
            raise CliError(f"{e}" if root else f"{e}; {no}") from None
        overlay_swaps(res, system.active_swaps())
        res["summary"] = {"file": str(summary_file), "age_seconds": round(age, 1)}
        print(f"tierswap: {e}; showing the summary written {age:.0f}s ago "
              f"({summary_file}), swap use as /proc/swaps says now", file=sys.stderr)
    print(json.dumps(res, indent=2) if args.json else render(res, columns, style))
    return 0  # a shard that does not answer is shown in the status, not an error of it


def cmd_restart(args) -> int:
    """Hand every process over to the code installed now, swap staying on: wait until the new
    supervisor answers and every shard it took over runs in a new process and serves."""
    before = _request(args, commands.Status())
    old = {s["index"]: s.get("pid") for s in before.get("shards", [])}
    # The running daemon may be older than this command (an upgrade): name a config only when
    # it is another file than the one it runs on, so that the plain request stays the same.
    new = str(Path(args.config).resolve()) if args.config else None
    if new is not None and new == _running_config(args):
        new = None
    req = commands.Restart(config=new)
    res = _request(args, req, timeout=args.timeout)
    print(req.render(res))
    deadline = time.monotonic() + args.timeout
    last = ""
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            st = _request(args, commands.Status(), timeout=5.0)
        except CliError as e:
            last = str(e)
            continue
        if st.get("supervisor", {}).get("pid") != res.get("supervisor"):
            last = "the old supervisor still answers"
            continue
        shards = st.get("shards", [])
        waiting = [s for s in shards
                   if s.get("state") != "serving" or s.get("pid") == old.get(s["index"])]
        failed = [s for s in shards if s.get("state") == "failed"]
        if failed:
            raise CliError("restart: shard(s) " + ", ".join(str(s["index"]) for s in failed)
                           + " failed to come back: " + (failed[0].get("reason") or "?"))
        if not waiting:
            shard_pids = " ".join(str(s.get("pid")) for s in shards)
            print(f"restarted: supervisor pid {res.get('supervisor')}, shard pids {shard_pids}; "
                  "swap stayed on")
            return 0
        last = "shard(s) " + ", ".join(str(s["index"]) for s in waiting) + " not replaced yet"
    raise CliError(f"restart: not finished after {args.timeout:.0f}s: {last}")


def _running_config(args) -> str | None:
    from tierswap.cleanup import read_state

    st = read_state(_config(args))
    return st.get("config") if isinstance(st.get("config"), str) else None


def cmd_check_config(args) -> int:
    config = _config(args)
    print(f"{config.source}: ok: {format_size(config.size)} virtual, {config.shards} shard(s), "
          + ", ".join(f"{t.name} ({t.kind}, {format_size(t.capacity)})" for t in config.tiers))
    for t in config.tiers:
        if t.sizing:  # derived, not given: say how (a file tier's is preallocated at start)
            print(f"tier {t.name}: {format_size(t.capacity)}, {t.sizing}")
    print("read: " + ", ".join(config.sources or (config.source,)))
    return 0


def cmd_inspect(args) -> int:
    req = commands.Inspect()
    return _show(args, req, _request(args, req))


def cmd_migrate(args) -> int:
    pages = nbytes = None
    if args.pages is not None:
        if args.pages <= 0:
            raise UsageError("--pages must be positive")
        pages = args.pages
    elif not args.all:
        try:
            nbytes = parse_size(args.bytes, "--bytes")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    if args.idle_for is not None and args.idle_for < 0:
        raise UsageError("--idle-for must be >= 0")
    try:
        req = commands.Migrate(src=args.src, dst=args.dst, pages=pages, bytes=nbytes,
                               all=args.all, idle_for=args.idle_for or 0.0)
    except ControlError as e:
        raise UsageError(str(e).removeprefix("migrate: ")) from None
    return _run_move(args, req)


def _run_move(args, req: commands.Request) -> int:
    t0 = time.monotonic()
    if sys.stdout.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        label = req.cmd
        columns = (TextColumn(label), BarColumn(),
                   TextColumn("{task.completed}/{task.total} pages"), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(label, total=None)

            def progress(p: dict[str, Any]) -> None:
                bar.update(task, completed=p.get("pages", 0), total=p.get("total") or None)

            res = _request(args, req, timeout=None, on_progress=progress)
    else:
        res = _request(args, req, timeout=None)
    dt = time.monotonic() - t0
    nbytes = res.get("bytes", 0)
    print(f"{req.render(res)} in {dt:.1f}s ({nbytes / 1e6 / dt if dt > 0 else 0:.1f} MB/s)")
    failed = commands.failures(res)
    if failed:
        raise CliError("; ".join(failed))
    return 0


def cmd_drain(args) -> int:
    req = commands.Drain(tier=args.tier)
    return _run_move(args, req)


def cmd_undrain(args) -> int:
    req = commands.Undrain(tier=args.tier)
    return _show(args, req, _request(args, req))


def cmd_compact(args) -> int:
    req = commands.Compact(tier=args.tier)
    return _show(args, req, _request(args, req, timeout=None))


def cmd_policy(args) -> int:
    updates: dict[str, str] = {}
    for kv in args.settings:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {kv!r}")
        updates[key] = value
    req = commands.SetPolicy(updates=updates)
    return _show(args, req, _request(args, req))


def cmd_bench(args) -> int:
    from tierswap import bench

    try:
        return bench.main(args)
    except bench.UsageError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------- parser


class CliError(TierswapError):
    pass


def _columns_help() -> str:
    from tierswap.status import DEFAULT_DEVICE, DEVICE_COLUMNS

    cols = "; ".join(f"{c.name}: {c.help}" for c in DEVICE_COLUMNS.values())
    return (f"comma-separated columns of the device table, one line per device (default "
            f"{','.join(DEFAULT_DEVICE)}). {cols}").replace("%", "%%")


def build_parser() -> Parser:
    p = Parser(prog="tierswap", description="A swap device served from user space, in tiers.")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, fn, help: str) -> Parser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", help="config file (default /etc/tierswap/tierswap.toml, "
                        "else the embedded default)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("up", cmd_up, "start the daemon and activate swap; prints the loop device(s)")
    sp.add_argument("--foreground", action="store_true", help="stay attached (for systemd)")
    sp = add("down", cmd_down, "swapoff, detach, unmount and stop; safe to run twice")
    sp.add_argument("--force", action="store_true", help="also clear what a crashed run left")
    sp.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for swapoff")
    sp.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    sp.add_argument("--unless-restarting", action="store_true",
                    help="under systemd: keep swap on during a restart (docs/operations.md)")
    sp = add("restart", cmd_restart, "replace every daemon process with the installed code; "
             "swap stays on")
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it")
    sp = add("status", cmd_status, "show the device, its tiers and counters")
    sp.add_argument("--json", action="store_true", help="the whole status record")
    sp.add_argument("--bytes", action="store_true", help="sizes in bytes, not human-readable")
    sp.add_argument("--raw", action="store_true",
                    help="the device table, fields separated by one space (as swapon --raw)")
    sp.add_argument("--noheadings", action="store_true",
                    help="the device table without its header line")
    sp.add_argument("--output", metavar="COLUMNS", help=_columns_help())
    add("check-config", cmd_check_config, "validate the configuration without starting anything")
    sp = add("inspect", cmd_inspect, "per-tier pages, idle ages and fragmentation")
    sp.add_argument("--json", action="store_true")
    sp = add("migrate", cmd_migrate, "move pages between tiers, coldest first")
    sp.add_argument("--from", dest="src", required=True)
    sp.add_argument("--to", dest="dst", required=True)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--pages", type=int)
    g.add_argument("--bytes")
    g.add_argument("--all", action="store_true")
    sp.add_argument("--idle-for", type=float, help="only pages idle at least this many seconds")
    sp = add("drain", cmd_drain, "move every page off a tier and stop placing pages there")
    sp.add_argument("tier")
    sp = add("undrain", cmd_undrain, "let a drained tier take pages again")
    sp.add_argument("tier")
    sp = add("compact", cmd_compact, "close holes in a file tier and give space back")
    sp.add_argument("tier")
    sp = add("policy", cmd_policy, "show or change the tiering policy at runtime")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    from tierswap.bench import add_arguments as bench_arguments

    help = "run the verifying workload against zram and a private tierswap; compare them"
    sp = sub.add_parser("bench", help=help, description=help)  # no --config: its own instance
    bench_arguments(sp)
    sp.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.fn(args)
    except UsageError as e:
        print(f"tierswap: usage error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"tierswap: config error: {e}", file=sys.stderr)
        return 2
    except TierswapError as e:
        print(f"tierswap: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"tierswap: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tierswap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
