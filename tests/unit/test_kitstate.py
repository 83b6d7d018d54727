"""Store state in kit memfds (tierswap/kitstate.py) and the sealers laid over them: adoption,
refusal of a foreign layout, and nonces that never repeat across a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tierswap.crypto import BLOCK, RESERVE_AHEAD, BlockSealer
from tierswap.kit import Kit, KitError
from tierswap.kitstate import PAGE, Field, Layout, claim, count_nonzero_rows
from tierswap.tiers.ecseal import FragmentSealer, FragmentSecrets

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


_made: list[Kit] = []


def replacement(kit: Kit) -> Kit:
    """What a new process gets: the same memfds under new fds (so new mappings)."""
    k = Kit(fds={k: os.dup(v) for k, v in kit.fds.items()}, fresh=False)
    _made.append(k)
    return k


@pytest.fixture(autouse=True)
def _close_replacements():
    yield
    while _made:
        _made.pop().close()


def test_a_region_is_adopted_only_once_committed_and_only_by_its_own_layout() -> None:
    kit = Kit()
    try:
        r = claim(kit, "state.1", 3 * PAGE, "owner/a")
        assert not r.adopted and len(r.payload) == 3 * PAGE
        r.payload[:5] = b"hello"
        # not committed yet (its maker "died"): a replacement starts afresh, wiped
        again = claim(replacement(kit), "state.1", 3 * PAGE, "owner/a")
        assert not again.adopted and bytes(again.payload[:5]) == bytes(5)
        again.payload[:5] = b"hello"
        again.commit()
        kit2 = replacement(kit)
        got = claim(kit2, "state.1", 3 * PAGE, "owner/a")
        assert got.adopted and bytes(got.payload[:5]) == b"hello"
        with pytest.raises(KitError, match="another layout"):
            claim(replacement(kit), "state.1", 3 * PAGE, "owner/b")
        with pytest.raises(KitError, match="smaller"):
            claim(replacement(kit), "state.1", 9 * PAGE, "owner/a")
        fresh = claim(replacement(kit), "state.1", 3 * PAGE, "owner/a", adopt=False)
        assert not fresh.adopted and bytes(fresh.payload[:5]) == bytes(5)
        with pytest.raises(KitError):
            claim(Kit(), "state.9", PAGE, "owner/a", adopt=True)
    finally:
        kit.close()


def test_layout_arrays_live_in_the_memfd_and_start_sparse() -> None:
    kit = Kit()
    try:
        layout = Layout("t", [Field("a", np.int16, (1 << 20, 2), -1),
                              Field("bits", np.bool_, (1 << 12, 1 << 10))])
        region, arrays = layout.open(kit, "state.0", "x")
        assert region is not None and not region.adopted
        assert (arrays["a"] == -1).all()
        arrays["bits"][3000, 123] = True
        region.commit()
        # a memfd page is allocated by a read too: count without touching the holes
        counts = count_nonzero_rows(arrays["bits"])
        assert counts.sum() == 1 and counts[3000] == 1
        resident = os.fstat(kit.fds["state.0"]).st_blocks * 512
        assert resident < 5 * MiB  # the 4 MiB of bits stayed a hole but for a page
        k2 = replacement(kit)
        region2, again = layout.open(k2, "state.0", "x")
        assert region2 is not None and region2.adopted
        assert again["bits"][3000, 123] and (again["a"] == -1).all()
    finally:
        kit.close()


def test_block_sealer_in_a_kit_is_adopted_with_its_key_and_tags() -> None:
    kit = Kit()
    try:
        s = BlockSealer.for_tier("file", "vault", 0, 8 * MiB, kit, 2)
        assert not s.adopted
        # the key is in the memfd only, never in a Python bytes object of the sealer
        assert not any(isinstance(v, bytes | bytearray) and len(v) == 32
                       for v in vars(s).values())
        data = os.urandom(3 * BLOCK + 100)
        sealed = bytes(s.seal(5 * BLOCK, data))
        k2 = replacement(kit)
        adopted = BlockSealer.for_tier("file", "vault", 0, 8 * MiB, k2, 2)
        assert adopted.adopted
        assert bytes(adopted.open(5 * BLOCK, sealed))[: len(data)] == data
        with pytest.raises(KitError):  # another tier's secrets are not ours
            BlockSealer.for_tier("file", "other", 0, 8 * MiB, replacement(kit), 2)
    finally:
        kit.close()


CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from tierswap.crypto import BLOCK, BlockSealer
    from tierswap.kit import Kit

    kit = Kit.from_env(os.environ["TIERSWAP_KIT"])
    s = BlockSealer.for_tier("file", "vault", 0, 8 << 20, kit, 0)
    assert s.adopted
    real = s._aead

    class Tell:  # reports each nonce's counter before it is used (a pipe write is atomic)
        def encrypt_into(self, nonce, *args):
            os.write(1, nonce[4:])
            return real.encrypt_into(nonce, *args)

    s._aead = Tell()
    data = os.urandom(8 * BLOCK)
    i = 0
    while True:
        s.seal((i * 7 % 2000) * BLOCK, data[: 1 + (i * 997) % len(data)])
        i += 1
""")


def test_nonce_counters_after_a_sigkill_are_beyond_every_counter_used() -> None:
    """A sealer killed at an arbitrary instant: its replacement's first counter is beyond
    every counter the dead one used (the reservation is written ahead, in the memfd)."""
    kit = Kit()
    try:
        first = BlockSealer.for_tier("file", "vault", 0, 8 * MiB, kit, 0)
        used = [first.take_counters(3) + 2]
        for _ in range(3):  # killed, replaced, killed again...
            env = dict(os.environ) | kit.env()
            p = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO)], env=env,
                                 pass_fds=list(kit.fds.values()), stdout=subprocess.PIPE)
            assert p.stdout is not None
            out = p.stdout.read(8 * 20000)  # ~20000 seals in, then at once:
            time.sleep(0.01 * len(used))
            os.kill(p.pid, signal.SIGKILL)
            out += p.stdout.read()
            p.wait()
            p.stdout.close()
            ctrs = np.frombuffer(out[: len(out) // 8 * 8], ">u8")
            assert len(ctrs) >= 20000 and len(np.unique(ctrs)) == len(ctrs)
            assert ctrs.min() > max(used)  # and it too started beyond its predecessor
            used.append(int(ctrs.max()))
        adopted = BlockSealer.for_tier("file", "vault", 0, 8 * MiB, replacement(kit), 0)
        nxt = adopted.take_counters(1)
        assert max(used) < nxt <= max(used) + 1 + RESERVE_AHEAD
    finally:
        kit.close()


def test_fragment_secrets_continue_after_the_dead_process_counters() -> None:
    kit = Kit()
    try:
        nbytes = FragmentSecrets.nbytes(4, 6, 64)
        r = claim(kit, "secrets.3", nbytes, "fs")
        s = FragmentSealer(FragmentSecrets(4, 6, 64, buffer=r.payload), b"ctx")
        assert not any(isinstance(v, bytes | bytearray) and len(v) == 32
                       for v in vars(s.secrets).values())
        r.commit()
        plain = os.urandom(2 * BLOCK)
        sealed, ctrs, _tags = s.seal(1, 2, 3, 5, plain)
        r2 = claim(replacement(kit), "secrets.3", nbytes, "fs")
        assert r2.adopted
        adopted = FragmentSealer(FragmentSecrets(4, 6, 64, buffer=r2.payload, fresh=False),
                                 b"ctx")
        assert adopted.open(1, 2, 3, 5, sealed, adopted.snapshot(1, 2, 5, 2)) == plain
        assert adopted.secrets.take_counters(1) > int(ctrs.max())
    finally:
        kit.close()
