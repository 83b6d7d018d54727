"""`tierswap` command line. Every failure is one line on stderr and a non-zero exit:
2 for bad usage or configuration, 1 for everything else; never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from tierswap import system
from tierswap.config import ConfigError, format_size, load_config, parse_size
from tierswap.control import ControlError, call

UP_TIMEOUT = 180.0
PING_TIMEOUT = 5.0


class UsageError(Exception):
    pass


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


def cmd_up(args) -> int:
    config = _config(args)
    from tierswap.supervisor import StartError, supervise

    if args.foreground:
        fd = os.environ.pop("TIERSWAP_READY_FD", None)
        from tierswap.logs import setup_logging

        setup_logging()
        try:
            return supervise(config, args.config, int(fd) if fd else None)
        except StartError as e:
            raise CliError(str(e)) from None
    if os.geteuid() != 0:
        raise CliError("must run as root (swapon, losetup and FUSE mounts need it)")
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logfile = config.run_dir / "tierswap.log"
    r, w = os.pipe()
    argv = [sys.executable, "-m", "tierswap", "up", "--foreground"]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    env = dict(os.environ, TIERSWAP_READY_FD=str(w))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                            pass_fds=(w,), start_new_session=True)
    os.close(fd)
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
    from tierswap.supervisor import force_cleanup, running_pid, stale_state

    pid = running_pid(config)
    if pid is not None:
        try:
            # a supervisor that does not even answer a ping is wedged: no point waiting on it
            call(config.control_socket, {"cmd": "ping"}, timeout=PING_TIMEOUT)
            call(config.control_socket, {"cmd": "down"}, timeout=args.timeout)
        except ControlError as e:
            if "swapoff failed" in str(e):
                raise CliError(str(e)) from None
            if not args.force:
                raise CliError(f"{e}; the supervisor (pid {pid}) does not answer: "
                               "use 'tierswap down --force'") from None
            os.kill(pid, signal.SIGKILL)
        # swapoff pulls every page back: give it the time it needs
        system.wait_for(lambda: not system.pid_alive(pid), timeout=args.timeout, interval=0.1)
        if system.pid_alive(pid):
            raise CliError(f"still stopping after {args.timeout:.0f}s (pid {pid})")
    left = stale_state(config)
    if left:
        if not args.force:
            raise CliError("left by a crashed run: " + "; ".join(left)
                           + " (use 'tierswap down --force')")
        for line in force_cleanup(config):
            print(line)
        left = stale_state(config)
        if left:
            raise CliError("could not clear: " + "; ".join(left))
    if pid is None and not args.quiet:
        print("tierswap is not running")
    return 0


def _request(args, req: dict[str, Any], timeout: float | None = 60.0, on_progress=None) -> Any:
    config = _config(args)
    try:
        return call(config.control_socket, req, timeout=timeout, on_progress=on_progress)
    except ControlError as e:
        raise CliError(str(e)) from None


def cmd_status(args) -> int:
    st = _request(args, {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        from tierswap.status import render_table

        print(render_table(st))
    return 0


def cmd_check_config(args) -> int:
    config = _config(args)
    print(f"{config.source}: ok: {format_size(config.size)} virtual, {config.shards} shard(s), "
          + ", ".join(f"{t.name} ({t.kind}, {format_size(t.capacity)})" for t in config.tiers))
    return 0


def cmd_inspect(args) -> int:
    res = _request(args, {"cmd": "inspect"})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        from tierswap.policy import render_inspect

        print(render_inspect(res))
    return 0


def cmd_migrate(args) -> int:
    req: dict[str, Any] = {"cmd": "migrate", "from": args.src, "to": args.dst}
    if args.all:
        req["all"] = True
    elif args.pages is not None:
        if args.pages <= 0:
            raise UsageError("--pages must be positive")
        req["pages"] = args.pages
    else:
        try:
            req["bytes"] = parse_size(args.bytes, "--bytes")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    if args.idle_for is not None:
        req["idle_for"] = args.idle_for
    return _run_move(args, req, f"{args.src} -> {args.dst}")


def _run_move(args, req: dict[str, Any], label: str) -> int:
    t0 = time.monotonic()
    if sys.stdout.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

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
    mb = res.get("bytes", 0) / 1e6
    print(f"moved {res.get('pages', 0)} pages ({format_size(res.get('bytes', 0))} stored) "
          f"{label} in {dt:.1f}s ({mb / dt if dt > 0 else 0:.1f} MB/s)")
    return 0


def cmd_drain(args) -> int:
    return _run_move(args, {"cmd": "drain", "tier": args.tier}, f"draining {args.tier}")


def cmd_undrain(args) -> int:
    _request(args, {"cmd": "undrain", "tier": args.tier})
    print(f"{args.tier}: accepting pages again")
    return 0


def cmd_compact(args) -> int:
    res = _request(args, {"cmd": "compact", "tier": args.tier}, timeout=None)
    print(f"{args.tier}: moved {res['pages']} pages, released {format_size(res['released_bytes'])}")
    return 0


def cmd_policy(args) -> int:
    updates: dict[str, str] = {}
    for kv in args.settings:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {kv!r}")
        updates[key] = value
    res = _request(args, {"cmd": "policy", "set": updates})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k} = {v}")
    return 0


# ---------------------------------------------------------------------------- parser


class CliError(Exception):
    pass


def build_parser() -> Parser:
    p = Parser(prog="tierswap", description="A swap device served from user space, in tiers.")
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
    sp = add("status", cmd_status, "show the device, its tiers and counters")
    sp.add_argument("--json", action="store_true")
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
    except (CliError, ControlError, system.SystemError_) as e:
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
