"""Migration racing foreground I/O, against a plain bytearray model.

One task issues writes, reads and discards on a small set of hot pages (serially, so the model
is exact); another keeps moving those same runs between tiers and cleaning segments. Moves
interleave at every await (file-tier I/O runs in threads), so a page overwritten or discarded
mid-move must end with the new content or discarded, never the old data, and every read
during a move must return the right bytes.
"""

from __future__ import annotations

import random

import numpy as np
import trio

from tierswap.config import parse_config
from tierswap.device import DeviceError, open_device
from tierswap.policy import Policy
from tierswap.slotmap import ZERO_TIER
from tierswap.tiers.file import prepare_file
from tierswap.workload import expected_pages

PAGE = 4096
NPAGES = 256


def make_config(tmp_path):
    cfg = parse_config(
        f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "{NPAGES * PAGE}"
[[tier]]
name = "ram"
kind = "memory"
capacity = "4M"
[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.tier"
capacity = "8M"
""",
        check_fs=False,
    )
    prepare_file(cfg.tiers[1].path, cfg.tiers[1].capacity)
    return cfg


class FakeShard:
    def __init__(self, config, device):
        self.config, self.device = config, device

    def tier_index(self, name):
        return next(t.index for t in self.device.tiers if t.name == name)


async def test_moves_race_writes_reads_discards(tmp_path):
    cfg = make_config(tmp_path)
    dev = await open_device(cfg, 0)
    policy = Policy(FakeShard(cfg, dev))
    model = bytearray(NPAGES * PAGE)
    rng = random.Random(5)
    content = expected_pages(11, np.arange(4 * NPAGES))
    moves = {"done": 0, "lost_race": 0}
    stop = trio.Event()

    async def mover():
        while not stop.is_set():
            runs = [r for r in dev.map.iter_runs() if r.tier != ZERO_TIER]
            if runs:
                run = rng.choice(runs)
                dst = dev.tiers[rng.randrange(len(dev.tiers))]
                n = rng.choice([None, 1, max(1, run.npages // 2)])
                try:
                    done = await dev.move_run(run, n, to=dst)
                except DeviceError:
                    done = 0
                moves["done" if done else "lost_race"] += 1
            if rng.random() < 0.05:
                await policy.clean(rng.randrange(len(dev.tiers)))
            await trio.sleep(0)

    async def foreground():
        for step in range(1500):
            first = rng.randrange(NPAGES - 16)
            n = rng.randrange(1, 16)
            op = rng.random()
            off, length = first * PAGE, n * PAGE
            if op < 0.45:
                k = rng.randrange(len(content) - n)
                data = content[k : k + n].tobytes()
                if rng.random() < 0.2:  # unaligned edges: read-modify-write inside the device
                    off += 100
                    data = data[: length - 300]
                await dev.write(off, data)
                model[off : off + len(data)] = data
            elif op < 0.85:
                got = await dev.read(off, length)
                assert got == bytes(model[off : off + length]), f"step {step}: stale read"
            else:
                await dev.discard(off, length)
                model[off : off + length] = bytes(length)
            await trio.sleep(0)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mover)
        nursery.start_soon(foreground)
    assert moves["done"] > 100, moves  # the race really happened, many times
    assert await dev.read(0, NPAGES * PAGE) == bytes(model)
    # accounting survived: pages counted per tier equal the pages in the map
    held = sum(int(np.count_nonzero(r.lens)) for r in dev.map.iter_runs() if r.tier != ZERO_TIER)
    assert held == sum(t.pages for t in dev.tiers)
    live = {t.index: 0 for t in dev.tiers}
    for r in dev.map.iter_runs():
        if r.tier != ZERO_TIER:
            live[r.tier] += r.nbytes
    assert live == {t.index: t.space.live_total for t in dev.tiers}
    await dev.discard(0, NPAGES * PAGE)
    assert all(t.space.live_total == 0 and t.pages == 0 for t in dev.tiers)
    for t in dev.tiers:
        await t.aclose()
    dev.map.close()


async def test_drain_moves_everything_and_undrain_accepts_again(tmp_path):
    cfg = make_config(tmp_path)
    dev = await open_device(cfg, 0)
    policy = Policy(FakeShard(cfg, dev))
    data = expected_pages(3, np.arange(NPAGES)).tobytes()
    await dev.write(0, data)
    assert dev.tiers[0].pages > 0

    async def progress(p):
        pass

    res = await policy.handle({"cmd": "drain", "tier": "ram"}, progress)
    assert dev.tiers[0].pages == 0 and res["left"] == 0 and res["pages"] > 0
    await dev.write(0, data[: 8 * PAGE])  # new pages avoid the draining tier
    assert dev.tiers[0].pages == 0
    assert await dev.read(0, len(data)) == data
    await policy.handle({"cmd": "undrain", "tier": "ram"}, progress)
    await dev.write(PAGE * 100, data[: 8 * PAGE])
    assert dev.tiers[0].pages > 0
    moved = await policy.handle({"cmd": "migrate", "from": "disk", "to": "ram", "pages": 10},
                                progress)
    assert moved["pages"] == 10
    assert 0 < dev.tiers[0].counters.promotions <= 10  # zero pages are not counted
    for t in dev.tiers:
        await t.aclose()
    dev.map.close()
