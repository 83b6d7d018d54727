"""Control socket: newline-delimited JSON over a Unix socket private to root.

Request: ``{"cmd": NAME, ...args}``. Reply: zero or more ``{"progress": {...}}`` lines, then
one ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``. Requests are
capped at 64 KiB and must be a JSON object naming a known command; anything else gets an
error reply, never a crash. The supervisor serves the public socket and fans out to the shard
workers' sockets with the same protocol.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

MAX_MESSAGE = 64 << 10
log = logging.getLogger(__name__)


class ControlError(Exception):
    """An error reply or a transport failure, worded for one line."""


Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


def _reply(line: bytes, on_progress: Callable[[dict[str, Any]], None] | None) -> tuple[bool, Any]:
    """One reply line: (True, result) when final, (False, None) after a progress line."""
    msg = json.loads(line)
    if "progress" in msg:
        if on_progress:
            on_progress(msg["progress"])
        return False, None
    if not msg.get("ok"):
        raise ControlError(msg.get("error", "unknown error"))
    return True, msg.get("result")


def first_error(e: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group: trio nurseries wrap errors in groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _read_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        if len(buf) > MAX_MESSAGE:
            raise ControlError("message too long")
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    buf = bytearray()
    async with stream:
        while True:
            try:
                line = await _read_line(stream, buf)
            except ControlError as e:
                await stream.send_all(_encode({"ok": False, "error": str(e)}))
                return
            if line is None:
                return
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ValueError("expected a JSON object with a \"cmd\" string")
            except ValueError as e:
                await stream.send_all(_encode({"ok": False, "error": f"bad request: {e}"}))
                continue
            async def progress(p: dict[str, Any]) -> None:
                await stream.send_all(_encode({"progress": p}))

            try:
                reply = {"ok": True, "result": await handler(req, progress)}
            except Exception as e:  # one bad request must not stop the server
                err = first_error(e)
                if not isinstance(err, ControlError | ValueError | KeyError | OSError):
                    log.exception("control request %r failed", req.get("cmd"))
                msg = str(err).strip("'\"") or type(err).__name__
                reply = {"ok": False, "error": msg.splitlines()[0]}
            await stream.send_all(_encode(reply))


async def serve_control(path: Path, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED):
    """Listen on `path` (mode 0600) until cancelled; one task per connection."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one_safely, stream, handler)
    finally:
        path.unlink(missing_ok=True)


async def _serve_one_safely(stream: trio.SocketStream, handler: Handler) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _serve_one(stream, handler)  # a client that went away is not an error


# ---------------------------------------------------------------------------- clients


async def acall(path: Path, req: dict[str, Any], *, timeout: float = 30.0,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Async client (supervisor -> shard)."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(_encode(req))
                buf = bytearray()
                while True:
                    line = await _read_line(stream, buf)
                    if line is None:
                        raise ControlError(f"{path}: connection closed without a reply")
                    final, result = _reply(line, on_progress)
                    if final:
                        return result
    except trio.TooSlowError:
        raise ControlError(f"{path}: no reply within {timeout:.0f}s") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None


def call(path: Path, req: dict[str, Any], *, timeout: float | None = 30.0,
         on_progress: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Blocking client for the CLI."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError("tierswap is not running (no control socket)") from None
        except ConnectionRefusedError:
            raise ControlError("tierswap is not running (stale control socket)") from None
        except PermissionError:
            raise ControlError("permission denied on the control socket (run as root)") from None
        s.sendall(_encode(req))
        f = s.makefile("rb")
        while True:
            line = f.readline(MAX_MESSAGE * 16)
            if not line:
                raise ControlError("the daemon closed the connection without a reply")
            final, result = _reply(line, on_progress)
            if final:
                return result
    except TimeoutError:
        raise ControlError("the daemon did not answer in time") from None
    finally:
        s.close()
