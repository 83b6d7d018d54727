"""A stand-in shard process: serves the real control protocol (tierswap.control) on the given
socket, answers every request with its pid, and exits 0 on `shutdown`. Run as
`python stand_in_shard.py SOCKET`; the tests signal, stop and kill it like a shard."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from tierswap.control import serve_control


async def main(path: str) -> None:
    done = trio.Event()

    async def handle(req, progress):
        if req["cmd"] == "shutdown":
            done.set()
        return {"pid": os.getpid()}

    async with trio.open_nursery() as n:
        await n.start(serve_control, Path(path), handle)
        await done.wait()
        n.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
