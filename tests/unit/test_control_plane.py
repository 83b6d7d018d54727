"""The control plane without root: the control server, the supervisor's fan-out and the whole
chain cli -> supervisor -> shards, on temporary Unix sockets.

Shards here are the real `tierswap.shard.Shard` serving real lanes (slot map and arenas in
memfds, a file tier under tmp_path) behind real control sockets; only the mount, loop devices
and swap are stand-ins (tests/unit/shard_fakes.py), because nothing on this path touches them.
Misbehaving shards are real sockets too: one that never answers, one that is gone, one that
answers garbage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from tests.unit.shard_fakes import FakeHost, FakeMounter
from tierswap import cli, commands, system
from tierswap.config import parse_config
from tierswap.control import acall, serve_control
from tierswap.kit import Kit
from tierswap.layout import Layout
from tierswap.shard import Shard
from tierswap.supervisor import Supervisor
from tierswap.tiers.file import prepare_file
from tierswap.workload import expected_pages

PAGE = 4096
NPAGES = 512


def make_config(tmp_path: Path, shards: int = 2):
    text = f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "{NPAGES * PAGE * shards}"
shards = {shards}
[[tier]]
name = "ram"
kind = "memory"
capacity = "8M"
[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.tier"
capacity = "16M"
"""
    (tmp_path / "tierswap.toml").write_text(text)
    cfg = parse_config(text, source=str(tmp_path / "tierswap.toml"), check_fs=False)
    prepare_file(cfg.tiers[1].path, cfg.tiers[1].capacity)
    return cfg


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, nursery: trio.Nursery, shards: int = 2, broken=()):
    """A supervisor whose shards are real Shard objects on real sockets (except `broken`)."""
    cfg = make_config(tmp_path, shards)
    lay = Layout.of(cfg)
    sup = Supervisor(cfg, str(tmp_path / "tierswap.toml"))
    lay.run_dir.mkdir(mode=0o700, exist_ok=True)
    running = []
    for slot in sup.slots:
        slot.paths.run_dir.mkdir(parents=True)
        slot.state = "serving"
        slot.device = f"/dev/loop{90 + slot.index}"
        if slot.index in broken:
            continue
        mounter = FakeMounter(FakeHost())
        me = Shard(cfg, slot.index, Kit(), mounter=mounter, host=mounter.host, threads=2)
        await nursery.start(me.serve)
        running.append(me)
        client = mounter.client(nursery)
        await client.write(0, expected_pages(slot.index, np.arange(64)).tobytes())
    await nursery.start(serve_control, lay.control_socket, sup.handle)
    try:
        yield sup
    finally:
        for me in running:
            me.request_stop("test over")


@pytest.fixture(autouse=True)
def no_swap(monkeypatch):
    monkeypatch.setattr(system, "active_swaps", lambda: {})


async def run_cli(*args: str) -> int:
    return await trio.to_thread.run_sync(cli.main, list(args))


async def test_migrate_through_the_whole_chain(tmp_path, nursery, capsys):
    async with cluster(tmp_path, nursery) as sup:
        conf = str(tmp_path / "tierswap.toml")
        assert await run_cli("migrate", "--from", "ram", "--to", "disk", "--pages", "21",
                             "--config", conf) == 0
        out = capsys.readouterr().out
        assert out.startswith("moved ") and "ram -> disk" in out
        moved = int(out.split()[1])  # whole records: at least what was asked for
        st = await sup.status()
        disk = st["tiers"][1]
        assert disk["pages"] + disk["zero_pages"] == moved >= 21 and not st["partial"]
        assert [s["state"] for s in st["shards"]] == ["serving", "serving"]
        assert await run_cli("inspect", "--config", conf) == 0
        assert "disk" in capsys.readouterr().out
        assert await run_cli("policy", "rate=32M", "--config", conf) == 0
        assert "rate = 33554432" in capsys.readouterr().out
        assert await run_cli("drain", "ram", "--config", conf) == 0
        assert (await sup.status())["tiers"][0]["pages"] == 0


async def test_bad_arguments_reach_no_shard(tmp_path, nursery, capsys):
    async with cluster(tmp_path, nursery) as sup:
        sock = Layout.of(sup.config).control_socket
        for wire, needle in (({"cmd": "drain", "tier": 5}, "string"),
                             ({"cmd": "stats"}, "unknown command"),
                             ({"cmd": "migrate", "from": "ram", "to": "disk"}, "exactly one")):
            with pytest.raises(commands.ControlError, match=needle):
                await acall(sock, wire, timeout=5)
        conf = str(tmp_path / "tierswap.toml")
        assert await run_cli("drain", "nosuch", "--config", conf) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no tier named 'nosuch" in err[0]


async def silent_shard(path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accepts connections and reads, never answers (a wedged shard)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    task_status.started()
    conns = []
    with sock:
        try:
            while True:
                conn, _ = await sock.accept()
                conns.append(conn)  # kept open, never answered
        finally:
            for conn in conns:
                conn.close()


async def garbage_shard(path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    listener = trio.SocketListener(sock)
    task_status.started()
    async with listener:
        while True:
            stream = await listener.accept()
            await stream.send_all(b"\xff\xfenot json\n")
            await stream.aclose()


@pytest.mark.parametrize("fault", ["silent", "gone", "garbage", "failed"])
async def test_one_bad_shard_gives_a_partial_answer(tmp_path, nursery, monkeypatch, fault):
    monkeypatch.setattr(commands.Stats, "shard_timeout", 0.5)
    monkeypatch.setattr(commands.Undrain, "shard_timeout", 0.5)
    async with cluster(tmp_path, nursery, shards=3, broken=(1,)) as sup:
        bad = sup.slots[1]
        if fault == "silent":
            await nursery.start(silent_shard, bad.paths.control_socket)
        elif fault == "garbage":
            await nursery.start(garbage_shard, bad.paths.control_socket)
        elif fault == "failed":
            bad.state = "failed"
        t0 = time.monotonic()
        st = await sup.handle({"cmd": "status"})
        assert time.monotonic() - t0 < 3
        assert st["partial"]
        rows = {s["index"]: s for s in st["shards"]}
        assert rows[0]["reporting"] and rows[2]["reporting"] and not rows[1]["reporting"]
        assert rows[1]["error"]
        if fault == "silent":
            assert "no reply within" in rows[1]["error"]
        if fault == "failed":
            assert rows[1]["state"] == "failed" and "is failed" in rows[1]["error"]
        # the two shards that answered are summed: 64 pages each were written
        assert st["pages"]["stored"] + st["pages"]["zero"] == 128
        table = commands.Status().render(st)
        row = next(ln for ln in table.splitlines() if ln.startswith("1 "))
        assert ("failed" if fault == "failed" else "not in the sums") in row, table
        # a tier command reports what the others did, and the failure, in one line
        res = await sup.handle({"cmd": "undrain", "tier": "ram"})
        assert res["tier"] == "ram"
        assert [e["shard"] for e in res["errors"]] == [1]


async def test_partial_move_prints_result_and_fails_in_one_line(tmp_path, nursery, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(commands.Migrate, "shard_timeout", 0.5)
    async with cluster(tmp_path, nursery, broken=(1,)) as sup:
        await nursery.start(silent_shard, sup.slots[1].paths.control_socket)
        conf = str(tmp_path / "tierswap.toml")
        assert await run_cli("migrate", "--from", "ram", "--to", "disk", "--pages", "10",
                             "--config", conf) == 1
        cap = capsys.readouterr()
        assert cap.out.startswith("moved ") and int(cap.out.split()[1]) >= 5
        err = cap.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tierswap: error: shard 1:"), err


async def test_progress_from_every_shard_reaches_the_client(tmp_path, nursery):
    async with cluster(tmp_path, nursery) as sup:
        seen: list[dict[str, Any]] = []
        res = await acall(Layout.of(sup.config).control_socket,
                          commands.Migrate(src="ram", dst="disk", all=True).to_wire(),
                          timeout=30, on_progress=seen.append)
        assert res["pages"] == 128
        assert seen and seen[-1]["pages"] <= 128


async def test_control_server_survives_a_handler_bug(tmp_path, nursery):
    calls = []

    async def handler(req: dict[str, Any], progress) -> Any:
        calls.append(req)
        if req["cmd"] == "boom":
            raise RuntimeError("a bug")
        return {"ok": 1}

    path = tmp_path / "c.sock"
    await nursery.start(serve_control, path, handler)
    with pytest.raises(commands.ControlError, match="a bug"):
        await acall(path, {"cmd": "boom"}, timeout=5)
    assert await acall(path, {"cmd": "fine"}, timeout=5) == {"ok": 1}
    assert path.stat().st_mode & 0o777 == 0o600


def test_shard_reply_is_frozen():
    r = commands.ShardReply(0, {"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.error = "x"  # type: ignore[misc]
