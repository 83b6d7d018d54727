from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration.harness import (
    config_text,
    leftovers,
    skip_without_capabilities,
    start,
    stop,
)


@pytest.fixture
def base():
    skip_without_capabilities()
    # not under pytest's tmp_path: keep mount paths short and off any tmpfs quirks
    d = Path(tempfile.mkdtemp(prefix="tierswap-test-", dir="/var/tmp"))
    yield d
    # instances using `d` were stopped by now (fixture teardown runs in reverse order);
    # if one was not, keep its files: deleting them under a live swap device loses its state
    if not leftovers(d / "run"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_instance(base):
    started = []

    def make(**kw):
        inst = start(base, config_text(base, **kw))
        started.append(inst)
        return inst

    yield make
    for inst in started:
        stop(inst.base, inst.config)
