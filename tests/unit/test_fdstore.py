"""systemd's fd store protocol (tierswap/fdstore.py): the FDSTORE datagrams a supervisor sends
(received on a real AF_UNIX datagram socket, fds by SCM_RIGHTS), sd_listen_fds parsing, the kit
rebuilt from the named fds alone in a process started the way systemd starts ExecStart=
(tests/sdstore.py), and the stop-versus-restart decision of `down --unless-restarting`."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sdstore import NotifyStore
from tierswap import fdstore
from tierswap.kit import Kit, KitError

ROOT = Path(__file__).parents[2]


def _kit(*names: str) -> Kit:
    kit = Kit(manifest={"version": 1, "shard": 0, "size": 1 << 30})
    for n in names:
        fd = kit.memfd(n, 4096)
        os.pwrite(fd, n.encode(), 0)
    return kit


def _drain(sock: socket.socket) -> list[tuple[str, list[int]]]:
    out = []
    sock.settimeout(0.2)
    while True:
        try:
            msg, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
        except TimeoutError:
            return out
        assert not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
        fds = array.array("i")
        for level, kind, data in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(data)
        out.append((msg.decode(), list(fds)))


def _messages(sock: socket.socket) -> list[str]:
    """The texts received, closing the fds they carried."""
    out = []
    for msg, fds in _drain(sock):
        for fd in fds:
            os.close(fd)
        out.append(msg)
    return out


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def test_push_kit_sends_one_fdstore_datagram_per_name_with_its_fd(receiver):
    kit = _kit("map", "arena.0")
    store = fdstore.FdStore()
    store.push_kit(3, kit)
    got = _drain(receiver)
    assert [m for m, _ in got] == [
        "FDSTORE=1\nFDNAME=tierswap.3.k.arena.0\nFDPOLL=0",
        "FDSTORE=1\nFDNAME=tierswap.3.k.map\nFDPOLL=0",
        f"FDSTORE=1\nFDNAME={fdstore.manifest_name(3, store.seq)}\nFDPOLL=0"]
    assert all(len(fds) == 1 for _, fds in got)
    # each fd is the kit's memfd itself (same file), not a copy
    for (_, [fd]), name in zip(got, ["arena.0", "map"], strict=False):
        assert os.pread(fd, len(name), 0) == name.encode()
        assert os.fstat(fd).st_ino == os.fstat(kit.fds[name]).st_ino
    mfd = got[2][1][0]
    desc = fdstore.read_manifest(mfd)
    assert desc == {"manifest": kit.manifest, "names": ["arena.0", "map"]}
    with pytest.raises(PermissionError):  # sealed: nobody can rewrite what a restart trusts
        os.pwrite(mfd, b"x", 0)
    assert store.count() == 3
    for _, fds in got:
        for fd in fds:
            os.close(fd)
    kit.close()


def test_a_changed_kit_stores_the_new_manifest_before_removing_the_old(receiver):
    kit = _kit("map")
    store = fdstore.FdStore()
    store.push_kit(0, kit)
    first = store.manifests[0]
    _messages(receiver)
    kit.memfd("arena.0", 4096)  # a replacement made a memfd its predecessor had not
    store.push_kit(0, kit)
    msgs = _messages(receiver)
    assert msgs == ["FDSTORE=1\nFDNAME=tierswap.0.k.arena.0\nFDPOLL=0",
                    "FDSTORE=1\nFDNAME=tierswap.0.k.map\nFDPOLL=0",
                    f"FDSTORE=1\nFDNAME={store.manifests[0]}\nFDPOLL=0",
                    f"FDSTOREREMOVE=1\nFDNAME={first}"]
    assert store.manifests[0] != first
    kit.close()


def test_a_name_given_another_file_is_removed_before_it_is_stored_again(receiver):
    kit = _kit("map")
    store = fdstore.FdStore()
    store.push_kit(0, kit)
    _messages(receiver)
    os.close(kit.fds.pop("map"))
    kit.memfd("map", 4096)  # another file under the same name: systemd would ignore nothing
    store.push_kit(0, kit)
    msgs = _messages(receiver)
    assert msgs[:2] == ["FDSTOREREMOVE=1\nFDNAME=tierswap.0.k.map",
                        "FDSTORE=1\nFDNAME=tierswap.0.k.map\nFDPOLL=0"]
    kit.close()


def test_tear_down_removes_every_name_manifest_first(receiver):
    kit = _kit("map", "arena.0")
    store = fdstore.FdStore()
    store.push_kit(1, kit)
    manifest = store.manifests[1]
    _messages(receiver)
    store.remove_all()
    got = _drain(receiver)
    assert [m for m, _ in got] == [f"FDSTOREREMOVE=1\nFDNAME={manifest}",
                                   "FDSTOREREMOVE=1\nFDNAME=tierswap.1.k.arena.0",
                                   "FDSTOREREMOVE=1\nFDNAME=tierswap.1.k.map"]
    assert all(fds == [] for _, fds in got) and store.count() == 0
    kit.close()


def test_abstract_notify_socket(monkeypatch):
    name = f"tierswap-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    fdstore.notify(fdstore.remove_message("tierswap.0.k.map"))
    assert _drain(s) == [("FDSTOREREMOVE=1\nFDNAME=tierswap.0.k.map", [])]
    s.close()


def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    store = fdstore.FdStore()
    kit = _kit("map")
    store.push_kit(0, kit)
    assert store.count() == 0 and not fdstore.enabled()
    kit.close()


def test_notify_to_a_missing_socket_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    with pytest.raises(fdstore.FdStoreError, match=r"^sd_notify: "):
        fdstore.notify("FDSTORE=1")


def test_names_are_valid_fd_names_and_parse_back():
    assert fdstore.kit_name(12, "fuse.3") == "tierswap.12.k.fuse.3"
    assert fdstore.parse_name("tierswap.12.k.fuse.3") == (12, "k", "fuse.3")
    assert fdstore.parse_name("tierswap.2.manifest.99") == (2, "manifest", "99")
    assert fdstore.parse_name("other.0.k.map") is None
    for bad in ("a:b", "a b", "x" * 300, ""):
        with pytest.raises(KitError):
            fdstore.kit_name(0, bad)


# ---------------------------------------------------------------------------- LISTEN_FDS


def test_listen_fds_wants_our_pid_and_unsets_the_variables():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert fdstore.listen_fds(env) is None
    assert env == {}  # never passed on to a child
    assert fdstore.listen_fds({"LISTEN_FDS": "1"}) is None
    assert fdstore.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) is None


def test_listen_fds_numbers_from_three_with_names():
    # fd 0, 1, 2 are open here: stand-ins for 3.. whose numbering is what is checked
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "only"}
        got = fdstore.listen_fds(env)
        assert got is not None and list(got.values()) == ["only"]
        assert list(got) == [fdstore.SD_LISTEN_FDS_START]
    finally:
        os.close(r)
        os.close(w)


def test_the_kit_is_rebuilt_from_the_named_fds_alone(tmp_path):
    """End to end: push a kit to a stand-in store, start a process the way systemd starts
    ExecStart= (fds from 3, LISTEN_*), rebuild the kit there and read every memfd back."""
    path = tmp_path / "notify"
    kit = _kit("map", "arena.0", "secrets.0")
    with NotifyStore(path) as sd:
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            store = fdstore.FdStore()
            store.push_kit(0, kit)
            store.push_kit(0, kit)  # twice: systemd keeps one fd per open file
            kit2 = _kit("map")
            kit2.manifest = {"version": 1, "shard": 1}
            store.push_kit(1, kit2)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        import time

        deadline = time.monotonic() + 5
        while len(sd.names()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(sd.names()) == sorted([
            "tierswap.0.k.arena.0", "tierswap.0.k.map", "tierswap.0.k.secrets.0",
            store.manifests[0], "tierswap.1.k.map", store.manifests[1]])
        env, fds = sd.listen_env()
        child = (
            "import json, os\n"
            "from tierswap import fdstore\n"
            "got = fdstore.listen_fds()\n"
            "r = fdstore.rebuild(got)\n"
            "print(json.dumps({'env': [k for k in os.environ if k.startswith('LISTEN_')],\n"
            "  'fds': sorted(got), 'problems': r.problems, 'stale': r.stale,\n"
            "  'kits': {k: {'manifest': v.manifest, 'data': {n: os.pread(fd, 16, 0).decode()\n"
            "   .rstrip(chr(0)) for n, fd in v.fds.items()}} for k, v in r.kits.items()}}))\n")
        p = subprocess.run([sys.executable, "-m", "tests.sdstore", "--", sys.executable, "-c",
                            child], env=dict(os.environ, **env), pass_fds=fds, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
    assert out["env"] == [] and out["fds"] == list(range(3, 9))
    assert out["problems"] == {} and out["stale"] == []
    assert out["kits"]["0"] == {"manifest": kit.manifest, "data": {
        "map": "map", "arena.0": "arena.0", "secrets.0": "secrets.0"}}
    assert out["kits"]["1"]["manifest"] == {"version": 1, "shard": 1}
    kit.close()
    kit2.close()


def _memfd(text: str) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.write(fd, text.encode())
    return fd


def _manifest_fd(names: list[str]) -> int:
    return _memfd(json.dumps({"manifest": {"shard": 0}, "names": names}))


def test_rebuild_refuses_an_incomplete_kit_and_drops_stale_entries():
    fds = {
        _memfd("m"): "tierswap.0.k.map",
        _manifest_fd(["map", "arena.0"]): "tierswap.0.manifest.5",  # newest: arena missing
        _manifest_fd(["map"]): "tierswap.0.manifest.4",
        _memfd("m"): "tierswap.1.k.map",
        _memfd("a"): "tierswap.1.k.old",  # stored once, no longer in the kit
        _manifest_fd(["map"]): "tierswap.1.manifest.7",
        _memfd("x"): "something-else",
        _memfd("y"): "tierswap.2.k.map",  # no manifest at all
    }
    r = fdstore.rebuild(fds)
    assert set(r.kits) == {1} and list(r.kits[1].fds) == ["map"]
    assert r.problems == {0: "its stored kit lacks arena.0",
                          2: "its stored kit has no manifest"}
    assert sorted(r.stale) == sorted([
        "tierswap.0.manifest.4", "tierswap.0.k.map", "tierswap.0.manifest.5",
        "tierswap.1.k.old", "tierswap.2.k.map"])
    assert r.manifests == {1: "tierswap.1.manifest.7"} and r.seq == 7
    r.close()
    assert r.kits == {} and "tierswap.1.manifest.7" in r.stale
    for fd in fds:  # every fd was either kept (and closed by close()) or closed
        with pytest.raises(OSError):
            fcntl.fcntl(fd, fcntl.F_GETFD)


# ---------------------------------------------------------------------------- stop or restart


def test_own_unit_from_cgroup_v1_and_v2():
    v1 = ("12:memory:/system.slice/tierswap.service\n"
          "1:name=systemd:/system.slice/tierswap.service\n0::/\n")
    assert fdstore.own_unit(v1) == "tierswap.service"
    assert fdstore.own_unit("0::/system.slice/tierswap.service\n") == "tierswap.service"
    assert fdstore.own_unit("0::/user.slice/user-0.slice/session-3.scope\n") is None


def test_job_type_from_list_jobs():
    listing = ("  41 tierswap.service     restart running\n"
               "  42 swap.target          start   waiting\n")
    assert fdstore.job_type("tierswap.service", listing) == "restart"
    assert fdstore.job_type("other.service", listing) is None
    assert fdstore.job_type("tierswap.service", "") is None


@pytest.mark.parametrize("job,stored,expected,keep", [
    ("stop", 10, 10, False),      # systemctl stop: swapoff
    ("restart", 10, 10, True),    # ExecStop=/ExecStopPost= of systemctl restart
    ("start", 10, 10, True),      # ExecStartPre= of the start that follows
    (None, 10, 10, True),         # ExecStopPost= after a crash, before Restart=
    ("restart", 0, 10, False),    # nothing stored: a restart without a swapoff would lose all
    ("restart", 7, 10, False),    # FileDescriptorStoreMax= cut the store short
    ("restart", 12, 10, True),    # a stale manifest more: fine
    ("restart", 5, None, True),   # no count recorded (an older state.json)
])
def test_keep_for_restart(job, stored, expected, keep):
    got, why = fdstore.keep_for_restart("tierswap.service", job, stored, expected)
    assert got is keep and why.startswith("tierswap.service: ") and "\n" not in why


@pytest.mark.parametrize("result,keep", [("success", False), ("signal", True),
                                         ("core-dump", True), (None, True)])
def test_no_job_keeps_the_store_only_when_a_restart_follows(result, keep):
    """ExecStopPost= with no job: Restart=on-failure restarts only a failed service."""
    got, why = fdstore.keep_for_restart("tierswap.service", None, 10, 10, result)
    assert got is keep and why.startswith("tierswap.service: ") and "\n" not in why


def test_down_unless_restarting_outside_systemd_is_a_plain_down(tmp_path, monkeypatch, capsys):
    """In an operator's shell (no service cgroup) the flag changes nothing."""
    from tierswap import cli

    monkeypatch.setattr(fdstore, "own_unit", lambda text=None: None)
    cfg = tmp_path / "t.toml"
    from tests.integration.harness import config_text

    cfg.write_text(config_text(tmp_path, size="64M", disk="64M"))
    assert cli.main(["down", "--unless-restarting", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out == "tierswap is not running\n"


# ---------------------------------------------------------------------------- park


def test_park_is_refused_unless_every_kit_is_in_the_store(tmp_path):
    """A restart may skip the swapoff only with every kit stored: a shard whose kit systemd
    does not hold would die with its connection."""
    from tests.unit.test_supervisor_watch import make_sup
    from tierswap import handover
    from tierswap.errors import ControlError
    from tierswap.supervisor import SERVING

    sup = make_sup(tmp_path, shards=2)

    async def main() -> None:
        for slot in sup.slots:
            slot.state = SERVING
            slot.pidfd = object()  # type: ignore[assignment]  # "a live process"
        sup._stored = {0: True}  # shard 1's kit did not (all) make it into the store
        with pytest.raises(ControlError, match=r"shard 1's kit is not \(all\) in the fd store"):
            await handover.park(sup)
        sup.slots[1].state = "restarting"
        with pytest.raises(ControlError, match="shard 1 is restarting"):
            await handover.park(sup)
        sup.slots[1].state = SERVING
        sup._stored = {0: True, 1: True}
        for slot in sup.slots:  # kits of another geometry than the config the next start reads
            slot.kit.manifest = {"version": -1}
        with pytest.raises(ControlError, match=r"shard 0: kit version -1.*could not take its"):
            await handover.park(sup)
        assert not sup.shutdown.is_set() and not sup.handed_over

    import trio

    trio.run(main)


def test_a_restore_never_reads_another_process_s_memory(tmp_path, monkeypatch):
    """Found by the integration test: the restoring supervisor read /proc/PID/cmdline of every
    process to find leftovers; a workload's argv page was out in swap on a device nobody
    served yet, so that read waited forever. With kits passed back, leftovers are found from
    the files' records only."""
    from tests.integration.harness import config_text
    from tierswap import cleanup, config, system

    monkeypatch.setattr(system, "loop_list", lambda: [])
    monkeypatch.setattr(system, "fuse_mounts_under", lambda prefix: [])

    def no(pid):
        raise AssertionError(f"read the command line of {pid}")

    monkeypatch.setattr(cleanup, "cmdline", no)
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text(config_text(tmp_path, size="64M", disk="64M"))
    cfg = config.load_config(str(cfg_path))
    cleanup.find_leftovers(cfg, scan=False).close()
    assert cleanup.adoptable_shards(cfg, scan=False) == []
    assert fdstore.stop_leftovers(cfg, [0]) == []
    with pytest.raises(AssertionError, match="command line"):
        cleanup.find_leftovers(cfg)  # the scan is still there for `down --force`


@pytest.mark.parametrize("states,keep", [(["serving", "serving"], False),
                                         (["serving", "restarting"], True), (None, True)])
def test_a_park_that_fails_falls_back_to_swapoff_only_if_nothing_was_parked(
        tmp_path, monkeypatch, capsys, states, keep):
    """Once a shard may have handed off (no process), a swapoff of its device would never
    end: a failed park then keeps swap on for the next start, whose kits are stored."""
    from contextlib import nullcontext

    from tests.integration.harness import config_text
    from tierswap import cleanup, cli, procs
    from tierswap.config import load_config
    from tierswap.errors import ControlError

    cfg = tmp_path / "t.toml"
    cfg.write_text(config_text(tmp_path, size="64M", disk="64M", shards=2))
    config = load_config(cfg, check_fs=False)
    monkeypatch.setattr(fdstore, "restart_decision", lambda c: (True, "unit: restart job"))
    monkeypatch.setattr(cleanup, "running_supervisor", lambda c: object())
    monkeypatch.setattr(procs.Pidfd, "open", staticmethod(lambda *a, **k: nullcontext()))

    def call(sock, wire, timeout=None, **kw):
        if wire["cmd"] == "park":
            raise ControlError("no reply in time")
        if states is None:
            raise ControlError("connection refused")
        return {"shards": [{"state": s} for s in states]}

    monkeypatch.setattr(cli, "call", call)
    args = cli.build_parser().parse_args(["down", "--unless-restarting", "--config", str(cfg)])
    assert cli._parked(args, config) is keep
    out = capsys.readouterr().out
    assert ("swap stays on" in out) is keep and out.count("\n") == 1
