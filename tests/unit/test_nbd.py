"""tierswap.nbd against real nbdkit servers.

Why real servers and not a fake: the point of the client is wire compatibility (handshake,
TLS, reply framing after errors), and a fake written from the same reading of the spec would
share our misreadings. nbdkit's filters give us the awkward cases: delay (timeouts), error
(errno replies, ESHUTDOWN), exportname (unknown export), --tls=require.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.netutil import free_port, spawn_nbdkit, wait_listening
from tierswap.nbd import (
    MAX_PAYLOAD,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    NBDClient,
    NBDDisconnected,
    NBDError,
    NBDHandshakeError,
    NBDTarget,
    NBDTimeout,
    open_nbd_client,
    parse_nbd_url,
)

MiB = 1 << 20


def _nbdkit_has_tls() -> bool:
    if shutil.which("nbdkit") is None:
        return False
    out = subprocess.run(["nbdkit", "--dump-config"], capture_output=True, text=True).stdout
    return "tls=yes" in out.splitlines()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, export: str = "", scheme: str = "nbd") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{export}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)




@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start nbdkit servers on 127.0.0.1 (args: filters, plugin, params); kill all at teardown."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed (apt install nbdkit)")
    servers: list[Server] = []

    def start(*args: str) -> Server:
        for _ in range(3):  # the free port can be taken between probe and bind: retry
            port = free_port()
            log = tmp_path / f"nbdkit-{port}.log"
            proc = spawn_nbdkit(port, args, log)
            server = Server(proc, port, log)
            servers.append(server)
            if wait_listening(proc, port, 5.0):
                return server
            server.stop()
            if "in use" not in log.read_text():
                break
        pytest.fail(f"nbdkit {' '.join(args)} did not start:\n{log.read_text()}")

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway CA and server cert for 127.0.0.1/localhost, plus an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = make_ca("tierswap test CA")
    _, other_ca = make_ca("some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    good, other = tmp_path_factory.mktemp("tls"), tmp_path_factory.mktemp("tls-other")
    (good / "ca-cert.pem").write_bytes(ca_cert.public_bytes(pem))
    (good / "server-cert.pem").write_bytes(server_cert.public_bytes(pem))
    key_file = good / "server-key.pem"
    key_file.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    key_file.chmod(0o600)
    (other / "ca-cert.pem").write_bytes(other_ca.public_bytes(pem))
    return good, other


async def _peak_inflight(client: NBDClient, stop: trio.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        stats = client.statistics()
        peaks["requests"] = max(peaks.get("requests", 0), stats.requests_inflight)
        peaks["bytes"] = max(peaks.get("bytes", 0), stats.bytes_inflight)
        await trio.sleep(0)


# -- URL parsing ------------------------------------------------------------------------------


def test_parse_nbd_url() -> None:
    assert parse_nbd_url("nbd://h") == NBDTarget("h", 10809, "", False)
    assert parse_nbd_url("nbd://h:1234/") == NBDTarget("h", 1234, "", False)
    assert parse_nbd_url("nbds://h/swap%20a") == NBDTarget("h", 10809, "swap a", True)
    assert parse_nbd_url("nbd://[::1]:99/a/b") == NBDTarget("::1", 99, "a/b", False)
    for bad in ["http://h/", "nbd:///x", "nbd://h:99999/", "nbd://u:p@h/", "nbd://h/x?tls=1",
                "nbd+unix:///x?socket=/s", "nbd://h:0/", "nbd://h/" + "x" * 4097, "nbd://h/a%00"]:
        with pytest.raises(ValueError, match="bad NBD URL") as info:
            parse_nbd_url(bad)
        assert "\n" not in str(info.value)


# -- against nbdkit ---------------------------------------------------------------------------


async def test_handshake_size_and_flags(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "64M")
    async with open_nbd_client(server.url()) as c:
        assert c.size == 64 * MiB
        assert (c.can_trim, c.can_flush, c.can_fua, c.read_only) == (True, True, True, False)
    readonly = nbdkit("-r", "memory", "1M")
    async with open_nbd_client(readonly.url()) as c:
        assert c.read_only and c.size == MiB
        with pytest.raises(NBDError) as info:
            await c.write(0, b"x")
        assert info.value.errno == errno.EPERM
        assert c.statistics().writes == 0  # refused locally, never sent
        assert await c.read(0, 4) == b"\0\0\0\0"


async def test_write_read_roundtrip(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "64M")
    async with open_nbd_client(server.url()) as c:
        cases = [(0, 4096), (1, 1), (4093, 10), (12345, 70000), (7 * MiB + 3, 3 * MiB),
                 (c.size - 512, 512), (c.size - 1, 1)]
        for offset, length in cases:
            data = os.urandom(length)
            await c.write(offset, data)
            assert await c.read(offset, length) == data
            buf = bytearray(length)
            await c.readinto(offset, memoryview(buf))
            assert buf == data
        await c.write(100, memoryview(b"0123456789")[2:6], fua=True)
        assert await c.read(100, 4) == b"2345"
        with pytest.raises(TypeError):
            await c.readinto(0, memoryview(b"read-only buffer"))
        assert c.statistics().requests_inflight == 0


async def test_many_concurrent_requests(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "64M")
    blocks = {i: os.urandom(4096) for i in range(200)}
    results: dict[int, bytes] = {}
    peaks: dict[str, int] = {}
    async with open_nbd_client(server.url(), max_inflight=64) as c:

        async def write(i: int) -> None:
            await c.write(i * 8192 + 17, blocks[i])  # spread out and unaligned

        async def read(i: int) -> None:
            results[i] = await c.read(i * 8192 + 17, 4096)

        for op in (write, read):
            stop = trio.Event()
            async with trio.open_nursery() as monitor:
                monitor.start_soon(_peak_inflight, c, stop, peaks)
                async with trio.open_nursery() as nursery:
                    for i in blocks:
                        nursery.start_soon(op, i)
                stop.set()
        stats = c.statistics()
    assert results == blocks
    assert 1 < peaks["requests"] <= 64
    assert (stats.writes, stats.reads, stats.requests_inflight, stats.bytes_inflight) == (
        200, 200, 0, 0)


async def test_inflight_bytes_are_bounded(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "64M")
    peaks: dict[str, int] = {}
    async with open_nbd_client(server.url(), max_inflight_bytes=64 << 10) as c:
        stop = trio.Event()
        async with trio.open_nursery() as monitor:
            monitor.start_soon(_peak_inflight, c, stop, peaks)
            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(c.write, i * (16 << 10), os.urandom(16 << 10))
            stop.set()
        assert 16 << 10 < peaks["bytes"] <= 64 << 10
        big = os.urandom(MiB)  # larger than the whole budget: admitted alone, not deadlocked
        with trio.fail_after(5):
            await c.write(0, big)
            assert await c.read(0, MiB) == big


async def test_trim_reads_zeros_and_flush(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "64M")
    async with open_nbd_client(server.url()) as c:
        await c.write(MiB, os.urandom(MiB))
        await c.trim(MiB, MiB)
        assert await c.read(MiB, MiB) == bytes(MiB)
        await c.flush()
        stats = c.statistics()
        assert (stats.trims, stats.flushes, stats.errors) == (1, 1, 0)


async def test_out_of_range_rejected_before_sending(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "1M")
    async with open_nbd_client(server.url()) as c:
        bad = [c.read(-1, 1), c.read(MiB, 1), c.read(MiB - 1, 2), c.read(0, 0),
               c.write(MiB - 1, b"ab"), c.write(0, b""), c.trim(0, MiB + 1), c.trim(0, 0),
               c.read(0, MAX_PAYLOAD + 1)]
        for coro in bad:
            with pytest.raises(ValueError):
                await coro
        stats = c.statistics()
        assert stats.reads == stats.writes == stats.trims == 0
        assert await c.read(MiB - 1, 1) == b"\0"  # the connection is untouched


async def test_server_killed_mid_session(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("--filter=delay", "memory", "64M", "delay-read=10")
    failures: list[BaseException] = []
    with pytest.raises(NBDDisconnected):  # escapes the block unwrapped, not as ExceptionGroup
        async with open_nbd_client(server.url()) as c:

            async def pending_read(i: int) -> None:
                try:
                    await c.read(i * 4096, 4096)
                except NBDDisconnected as exc:
                    failures.append(exc)

            with trio.fail_after(3):
                async with trio.open_nursery() as nursery:
                    for i in range(5):
                        nursery.start_soon(pending_read, i)
                    while c.statistics().requests_inflight < 5:
                        await trio.sleep(0.01)
                    server.proc.kill()
                assert len(failures) == 5
                assert c.statistics().requests_inflight == 0
                await c.write(0, b"new request")


async def test_unknown_export(nbdkit: Callable[..., Server]) -> None:
    # nbdkit memory serves any export name; the exportname filter makes it strict.
    server = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                    "exportname=swap")
    async with open_nbd_client(server.url("swap")) as c:
        assert c.size == MiB
    with pytest.raises(NBDHandshakeError, match="NBD_REP_ERR_UNKNOWN") as info:
        async with open_nbd_client(server.url("nope")):
            pass
    assert info.value.reply == NBD_REP_ERR_UNKNOWN


async def test_request_timeout(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("--filter=delay", "memory", "1M", "delay-read=1")
    async with open_nbd_client(server.url(), timeout=0.3) as c:
        buf = bytearray(b"\xff" * 4096)
        start = trio.current_time()
        with pytest.raises(NBDTimeout):
            await c.readinto(0, memoryview(buf))
        assert trio.current_time() - start < 0.8
        stats = c.statistics()
        assert (stats.timeouts, stats.requests_inflight) == (1, 1)  # the server still has it
        with trio.fail_after(3):  # the late reply arrives and its payload is drained...
            while c.statistics().requests_inflight:
                await trio.sleep(0.02)
        assert buf == b"\xff" * 4096  # ...not written into the buffer of a caller who gave up
        await c.write(0, b"still in sync")  # the next reply parses: the stream is in sync
        assert c.statistics().requests_inflight == 0


async def test_error_reply_keeps_stream_in_sync(nbdkit: Callable[..., Server],
                                                tmp_path: Path) -> None:
    # nbdkit sends no payload after a failed READ; reading on proves we agree on framing.
    trigger = tmp_path / "fail-reads"
    server = nbdkit("--filter=error", "memory", "1M", "error-pread=EIO",
                    "error-pread-rate=100%", f"error-pread-file={trigger}")
    async with open_nbd_client(server.url()) as c:
        await c.write(0, b"abcd")
        trigger.touch()
        with pytest.raises(NBDError) as info:
            await c.read(0, 4)
        assert info.value.errno == errno.EIO
        trigger.unlink()
        assert await c.read(0, 4) == b"abcd"
        assert c.statistics().errors == 1


async def test_eshutdown_stops_new_requests(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("--filter=error", "memory", "1M", "error-pread=ESHUTDOWN",
                    "error-pread-rate=100%")
    async with open_nbd_client(server.url()) as c:
        with pytest.raises(NBDError) as info:
            await c.read(0, 4)
        assert info.value.errno == errno.ESHUTDOWN
        with pytest.raises(NBDDisconnected, match="shutting down"):
            await c.write(0, b"x")


async def test_connect_failures(nbdkit: Callable[..., Server]) -> None:
    with pytest.raises(NBDDisconnected, match="cannot connect"):
        async with open_nbd_client(f"nbd://127.0.0.1:{free_port()}/", timeout=2):
            pass
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts into the backlog but never speaks
    with silent, pytest.raises(NBDTimeout, match="handshake"):
        async with open_nbd_client(f"nbd://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.3):
            pass

    async def not_nbd(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, not_nbd, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(NBDHandshakeError, match="not an NBD server"):
            async with open_nbd_client(f"nbd://127.0.0.1:{port}/"):
                pass
        nursery.cancel_scope.cancel()


async def test_connect_with_caller_nursery(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "1M")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            c = await NBDClient.connect(server.url(), nursery=nursery)
            await c.write(0, b"owned by the caller's nursery")
            assert await c.read(0, 5) == b"owned"
            await c.aclose()
            await c.aclose()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await c.read(0, 1)
        # leaving the nursery proves the reader task ended by itself after aclose()


tls_only = pytest.mark.skipif(not _nbdkit_has_tls(),
                              reason="nbdkit not installed or built without TLS (no tls=yes "
                                     "in nbdkit --dump-config)")


@tls_only
async def test_tls_roundtrip(nbdkit: Callable[..., Server], tls_dirs: tuple[Path, Path]) -> None:
    certs, _ = tls_dirs
    server = nbdkit("--tls=require", f"--tls-certificates={certs}", "memory", "64M")
    ca = str(certs / "ca-cert.pem")
    blocks = {i: os.urandom(65536) for i in range(32)}
    async with open_nbd_client(server.url(scheme="nbds"), tls_ca=ca) as c:
        async with trio.open_nursery() as nursery:
            for i, data in blocks.items():
                nursery.start_soon(c.write, i * 65536, data)
        for i, data in blocks.items():
            assert await c.read(i * 65536, 65536) == data
    async with open_nbd_client(server.url(scheme="nbds"), tls_ca=ca,
                               tls_hostname="localhost") as c:
        assert await c.read(0, 65536) == blocks[0]


@tls_only
async def test_tls_failures(nbdkit: Callable[..., Server], tls_dirs: tuple[Path, Path]) -> None:
    certs, other = tls_dirs
    server = nbdkit("--tls=require", f"--tls-certificates={certs}", "memory", "1M")
    with pytest.raises(NBDHandshakeError, match="TLS_REQD") as info:
        async with open_nbd_client(server.url()):
            pass
    assert info.value.reply == NBD_REP_ERR_TLS_REQD
    with pytest.raises(NBDHandshakeError, match="certificate verify failed"):
        async with open_nbd_client(server.url(scheme="nbds"), tls_ca=str(other / "ca-cert.pem")):
            pass
    with pytest.raises(NBDHandshakeError, match="certificate verify failed"):
        async with open_nbd_client(server.url(scheme="nbds"), tls_ca=str(certs / "ca-cert.pem"),
                                   tls_hostname="nbd.example.com"):
            pass
    plain = nbdkit("memory", "1M")  # TLS demanded, server offers none: no plaintext fallback
    with pytest.raises(NBDHandshakeError, match="STARTTLS"):
        async with open_nbd_client(plain.url(scheme="nbds"), tls_ca=str(certs / "ca-cert.pem")):
            pass
