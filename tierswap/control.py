"""Control socket: newline-delimited JSON over a Unix socket private to root.

Request: ``{"cmd": NAME, ...args}``. Reply: zero or more ``{"progress": {...}}`` lines, then
one ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``. The supervisor
serves the public socket and fans out to the shard workers' sockets with the same protocol.

The server is part of a process that holds swapped pages (in a shard, the FUSE server), so
no input may end it, and no client may stall it. Limits, each answered with a one-line
error (or a closed connection when the client no longer listens), never a crash:

* a request line is at most MAX_MESSAGE bytes, strict UTF-8 JSON, nested at most MAX_DEPTH
  levels (checked before decoding: the decoder recurses once per level and would raise
  RecursionError), without NaN/Infinity, and must be an object with a "cmd" string;
* at most MAX_CLIENTS connections are served at once; one more is told so and closed;
* a client has REQUEST_TIMEOUT seconds to send each request line, and every reply line
  must be taken within SEND_TIMEOUT seconds: a client that stops reading is dropped
  (and a command it was watching, such as a migrate, is cancelled as on a hang-up);
* anything a handler raises ends that request with an error reply; anything else that goes
  wrong with one connection ends that connection and is logged, never the server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tierswap.errors import ControlError, TierswapError
from tierswap.kit import FdReply

MAX_MESSAGE = 64 << 10  # bytes in one request line
MAX_REPLY = 4 << 20  # bytes in one reply line, for the clients
MAX_DEPTH = 32  # nesting of arrays and objects in a request
MAX_CLIENTS = 64  # connections served at once
REQUEST_TIMEOUT = 30.0  # seconds to send one request line
SEND_TIMEOUT = 10.0  # seconds for a client to take one reply line
MAX_ERROR = 400  # characters of an error reply
log = logging.getLogger(__name__)


class _Gone(Exception):
    """The client stopped reading or went away: drop the connection."""


Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


def _reply(line: bytes, on_progress: Callable[[dict[str, Any]], None] | None) -> tuple[bool, Any]:
    """One reply line: (True, result) when final, (False, None) after a progress line."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        raise ControlError("malformed reply from the daemon") from None
    if not isinstance(msg, dict):
        raise ControlError("malformed reply from the daemon")
    if "progress" in msg:
        if on_progress and isinstance(msg["progress"], dict):
            on_progress(msg["progress"])
        return False, None
    if not msg.get("ok"):
        raise ControlError(str(msg.get("error", "unknown error")))
    return True, msg.get("result")


def first_error(e: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group: trio nurseries wrap errors in groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _one_line(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= MAX_ERROR else line[: MAX_ERROR - 3] + "..."


def nesting_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text, brackets inside strings not counted.

    Linear and iterative, so it is safe on input that would make a recursive decoder fail."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case, at C speed
        return MAX_DEPTH
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode one request line; ValueError (one line) for anything that is not a request."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        req = json.loads(text, parse_constant=_no_constants)
    except RecursionError:  # unreachable after the depth check; never let it escape
        raise ValueError("nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise ValueError('expected a JSON object with a "cmd" string')
    return req


async def _read_line(stream: trio.SocketStream, buf: bytearray, limit: int) -> bytes | None:
    """The next line without its newline; None at end of stream (a partial line is dropped)."""
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        if len(buf) > limit:
            raise ControlError(f"message longer than {limit} bytes")
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send(self, obj: Any) -> None:
        """One line to the client, within SEND_TIMEOUT, or _Gone."""
        await self.send_line(_encode(obj))

    async def send_line(self, data: bytes) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise _Gone("client does not read its replies") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Gone("client went away") from None

    async def send_fds(self, data: bytes, fds: list[int]) -> None:
        """A reply line carrying file descriptors (SCM_RIGHTS), in one sendmsg."""
        import array

        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            with trio.fail_after(SEND_TIMEOUT):
                sent = await self.stream.socket.sendmsg([data], anc)
        except trio.TooSlowError:
            raise _Gone("client does not read its replies") from None
        except OSError:
            raise _Gone("client went away") from None
        if sent != len(data):
            raise _Gone("kit reply cut short")

    async def serve(self, handler: Handler) -> None:
        buf = bytearray()
        while True:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await _read_line(self.stream, buf, MAX_MESSAGE)
            except trio.TooSlowError:
                await self.send({"ok": False, "error": "no complete request within "
                                                      f"{REQUEST_TIMEOUT:.0f}s"})
                return
            except ControlError as e:  # too long: the rest of the line cannot be trusted
                await self.send({"ok": False, "error": f"bad request: {e}"})
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if line is None:
                return
            try:
                req = parse_request(line)
            except ValueError as e:
                await self.send({"ok": False, "error": _one_line(f"bad request: {e}")})
                continue

            async def progress(p: dict[str, Any]) -> None:
                await self.send({"progress": p})

            fds: list[int] = []
            try:
                result = await handler(req, progress)
                if isinstance(result, FdReply):  # the kit: fds travel with the reply
                    result, fds = result.result, result.fds
                # encoded here: a result that is not JSON is the handler's bug, answered as one
                data = _encode({"ok": True, "result": result})
            except _Gone:
                raise
            except Exception as e:  # one bad request must not stop the server
                err = first_error(e)
                if isinstance(err, _Gone):
                    raise err from None
                if not isinstance(err, TierswapError | ValueError | KeyError | OSError):
                    log.exception("control request %r failed", _one_line(str(req.get("cmd"))))
                msg = str(err).strip("'\"") or type(err).__name__
                data = _encode({"ok": False, "error": _one_line(msg)})
            if fds:
                await self.send_fds(data, fds)
            else:
                await self.send_line(data)


async def _serve_one(stream: trio.SocketStream, handler: Handler, slots: trio.Semaphore) -> None:
    """One connection, isolated: whatever happens here ends this connection only."""
    try:
        async with stream:
            await _Connection(stream).serve(handler)
    except _Gone as e:
        log.debug("control client dropped: %s", e)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("control connection failed")
    finally:
        slots.release()


async def _refuse(stream: trio.SocketStream) -> None:
    """Over MAX_CLIENTS: say so in one line (never waiting on the client) and close."""
    with trio.move_on_after(0.1), contextlib.suppress(trio.BrokenResourceError, OSError):
        await stream.send_all(_encode({"ok": False, "error": "too many control clients, "
                                                             "try again"}))
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def serve_control(path: Path, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` (mode 0600) until cancelled; one task per connection.

    The socket is bound under a temporary name and renamed over `path`, so a successor
    (`tierswap restart`) replaces its predecessor's socket with no moment where none answers;
    on the way out it is unlinked only if `path` still is this socket, never the successor's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        old = os.umask(0o177)
        try:
            await sock.bind(str(tmp))
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        sock.listen(MAX_CLIENTS)
        mine = os.stat(tmp)
        os.rename(tmp, path)
        listener = trio.SocketListener(sock)
        slots = trio.Semaphore(MAX_CLIENTS)
        task_status.started()
        try:
            async with listener, trio.open_nursery() as nursery:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:  # EMFILE/ENFILE/ENOBUFS: wait for room, keep serving
                        if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                           errno.ENOMEM):
                            raise
                        log.warning("control socket: accept failed: %s", e.strerror)
                        await trio.sleep(0.1)
                        continue
                    try:
                        slots.acquire_nowait()
                    except trio.WouldBlock:
                        await _refuse(stream)
                        continue
                    nursery.start_soon(_serve_one, stream, handler, slots)
        finally:
            _unlink_if_same(path, mine)


def _unlink_if_same(path: Path, mine: os.stat_result) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            path.unlink()


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
                    line = await _read_line(stream, buf, MAX_REPLY)
                    if line is None:
                        raise ControlError(f"{path}: connection closed without a reply")
                    final, result = _reply(line, on_progress)
                    if final:
                        return result
    except trio.TooSlowError:
        raise ControlError(f"{path}: no reply within {timeout:g}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise ControlError(f"{path}: connection lost before a reply") from None
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
            line = f.readline(MAX_REPLY + 1)
            if not line:
                raise ControlError("the daemon closed the connection without a reply")
            if not line.endswith(b"\n"):
                raise ControlError(f"reply longer than {MAX_REPLY} bytes")
            final, result = _reply(line, on_progress)
            if final:
                return result
    except TimeoutError:
        raise ControlError("the daemon did not answer in time") from None
    except OSError as e:
        raise ControlError(f"control socket: {e.strerror or e}") from None
    finally:
        s.close()
