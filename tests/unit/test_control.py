"""tierswap.control: hostile input on a real Unix socket, without root.

Each test runs the real server on a temporary socket and attacks it the way a broken or
malicious client would; afterwards the server must still answer a plain request. Before the
hardening, deeply nested JSON raised RecursionError out of the connection task, which ended
the whole control server (and in a shard, FUSE with it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from tierswap import control
from tierswap.control import ControlError, acall, serve_control


@pytest.fixture
def sock_path():
    d = Path(tempfile.mkdtemp(prefix="ts-ctl-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield d / "c.sock"
    shutil.rmtree(d, ignore_errors=True)


async def handler(req: dict[str, Any], progress) -> Any:
    cmd = req["cmd"]
    if cmd == "ping":
        return {"pong": True}
    if cmd == "big":
        return "x" * (1 << 20)
    if cmd == "typeerror":
        return req["n"] >= 3  # a bad argument: str >= int
    if cmd == "multiline":
        raise ValueError("first line\nsecond line\nthird")
    if cmd == "unserialisable":
        return {"a": object()}
    if cmd == "progress":
        for i in range(int(req.get("n", 3))):
            await progress({"i": i, "pad": "p" * int(req.get("pad", 0))})
        return "done"
    if cmd == "sleep":
        await trio.sleep(float(req["s"]))
        return "slept"
    raise ControlError(f"unknown command {cmd!r}")


@pytest.fixture
async def server(nursery, sock_path):
    await nursery.start(serve_control, sock_path, handler)
    return sock_path


async def raw(path: Path, data: bytes, *, replies: int = 1, close: bool = False) -> list[Any]:
    """Send raw bytes, read `replies` reply lines (fewer if the server closes)."""
    s = await trio.open_unix_socket(str(path))
    async with s:
        await s.send_all(data)
        if close:
            return []
        buf = bytearray()
        out: list[Any] = []
        with trio.fail_after(10):
            while len(out) < replies:
                chunk = await s.receive_some(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf and len(out) < replies:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    out.append(json.loads(line))
        return out


async def alive(path: Path) -> None:
    assert await acall(path, {"cmd": "ping"}, timeout=5) == {"pong": True}


def one_line_error(reply: dict[str, Any], *needles: str) -> str:
    assert reply["ok"] is False, reply
    msg = reply["error"]
    assert isinstance(msg, str) and "\n" not in msg and len(msg) <= control.MAX_ERROR
    for n in needles:
        assert n in msg, (n, msg)
    return msg


async def test_deep_nesting_is_refused_and_the_connection_goes_on(server):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):  # what the decoder alone does with it
        json.loads(deep)
    r = await raw(server, deep.encode()[: control.MAX_MESSAGE - 2] + b"\n"
                  + b'{"cmd": "ping"}\n', replies=2)
    one_line_error(r[0], "nested deeper")
    assert r[1] == {"ok": True, "result": {"pong": True}}
    # nesting inside strings is not nesting
    r = await raw(server, json.dumps({"cmd": "ping", "s": "[" * 1000}).encode() + b"\n")
    assert r[0]["ok"]
    await alive(server)


def test_nesting_depth_counts_only_structure():
    assert control.nesting_depth('{"a": [[1]], "b": "[[[[[["}') <= control.MAX_DEPTH
    assert control.nesting_depth("[" * 40 + "]" * 40) == 40
    assert control.nesting_depth('["\\"[[[[", ' + "[" * 33 + "]" * 34) == 34


async def test_line_over_the_cap(server):
    r = await raw(server, b'{"cmd": "ping", "x": "' + b"a" * (control.MAX_MESSAGE + 100))
    one_line_error(r[0], "longer than")
    await alive(server)


@pytest.mark.parametrize(("line", "needle"), [
    (b'{"cmd": "\xff\xfe"}', "not UTF-8"),
    (b"\xef\xbb\xbf\x00\x00", "not JSON"),
    (b"\xed\xa0\x80", "not UTF-8"),  # a lone surrogate
    (b"not json", "not JSON"),
    (b"[1, 2]", '"cmd" string'),
    (b'{"cmd": 7}', '"cmd" string'),
    (b'{"cmd": "ping", "n": NaN}', "NaN"),
    (b'{"cmd": "ping", "n": ' + b"9" * 5000 + b"}", "not JSON"),
    (b'{"cmd": "nosuch"}', "unknown command"),
    (b'{"cmd": "typeerror", "n": "x"}', "not supported"),
    (b'{"cmd": "typeerror"}', "n"),
    (b'{"cmd": "multiline"}', "first line"),
    (b'{"cmd": "unserialisable"}', "JSON serializable"),
    (b'{"cmd": "' + b"z" * 60000 + b'"}', "unknown command"),
])
async def test_bad_requests_get_one_line_errors(server, line, needle, caplog):
    r = await raw(server, line + b"\n" + b'{"cmd": "ping"}\n', replies=2)
    one_line_error(r[0], needle)
    assert r[1]["ok"], "the same connection keeps serving"
    await alive(server)


async def test_half_a_line_then_hang_up(server, caplog):
    for _ in range(20):
        await raw(server, b'{"cmd": "pi', close=True)
    await alive(server)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_client_that_sends_nothing_is_timed_out(server, monkeypatch):
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3)
    s = await trio.open_unix_socket(str(server))
    async with s:
        await s.send_all(b'{"cmd": "pi')  # and never the rest
        with trio.fail_after(5):
            data = b""
            while chunk := await s.receive_some(4096):
                data += chunk
    one_line_error(json.loads(data), "no complete request")
    await alive(server)


async def test_a_client_that_never_reads_does_not_block_the_server(server, monkeypatch):
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    hog = await trio.open_unix_socket(str(server))
    async with hog:
        # replies of 1 MiB each, never read: the server's send blocks on a full socket
        with trio.move_on_after(2):
            for _ in range(50):
                await hog.send_all(b'{"cmd": "big"}\n')
        # meanwhile every other client is served at once
        with trio.fail_after(2):
            for _ in range(5):
                await alive(server)
        # and the server drops the hog once SEND_TIMEOUT has passed
        with trio.fail_after(10):
            while True:
                try:
                    await hog.send_all(b'{"cmd": "big"}\n' * 1000)
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.05)
    await alive(server)


async def test_a_watcher_that_stops_reading_cancels_its_command(server, monkeypatch):
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.3)
    s = await trio.open_unix_socket(str(server))
    async with s:
        await s.send_all(b'{"cmd": "progress", "n": 100000, "pad": 60000}\n')
        with trio.fail_after(10):  # dropped, not blocking: the socket closes from the server
            while True:
                try:
                    await s.send_all(b"x" * 65536)
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.05)
    await alive(server)


async def test_concurrent_clients_are_bounded_and_all_answered(server, monkeypatch):
    idle: list[trio.SocketStream] = []
    try:
        for _ in range(control.MAX_CLIENTS):
            idle.append(await trio.open_unix_socket(str(server)))
        await trio.sleep(0.2)
        # one more: refused at once in one line, not queued behind the idle ones
        with trio.fail_after(5):
            r = await raw(server, b'{"cmd": "ping"}\n')
        one_line_error(r[0], "too many")
    finally:
        for s in idle:
            await s.aclose()
    await trio.sleep(0.2)
    # dozens at once, each with a request that takes a while: every one gets its reply
    results: list[Any] = []

    async def one() -> None:
        results.append(await acall(server, {"cmd": "sleep", "s": 0.2}, timeout=10))

    async with trio.open_nursery() as n:
        for _ in range(48):
            n.start_soon(one)
    assert results == ["slept"] * 48
    await alive(server)


async def test_every_attack_at_once_then_the_server_still_answers(server, monkeypatch):
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 1.0)
    attacks = [b"[" * 70000, b"\xff" * 10 + b"\n", b'{"cmd": "pi', b'{"cmd":"x"}\n' * 500,
               b'{"cmd": "big"}\n' * 20]

    async def attack(data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await raw(server, data, close=True)

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(attack, attacks[i % len(attacks)])
    await alive(server)


async def test_client_rejects_malformed_replies(sock_path, nursery):
    async def bad_server(task_status=trio.TASK_STATUS_IGNORED):
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(str(sock_path))
        sock.listen(4)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener:
            for reply in (b"[[[\n", b'"just a string"\n', b"\xff\n"):
                s = await listener.accept()
                async with s:
                    await s.receive_some(100)
                    await s.send_all(reply)

    await nursery.start(bad_server)
    for _ in range(3):
        with pytest.raises(ControlError, match="malformed reply"):
            await acall(sock_path, {"cmd": "ping"}, timeout=5)
