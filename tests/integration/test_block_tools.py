"""The device driven by a tool nobody here wrote: fio's own verifier, at queue depth and with
request sizes from 512 bytes up, on the real loop device and on the mounted file.

Swap writes whole pages; any other block-device client does not, and several at once when its
queue depth is above one (issue 8, item 2). fio writes every block with a checksum and a header
naming its offset, and reads everything back to check it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.integration.harness import cli

pytestmark = pytest.mark.integration


def fio(target: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (.ci/setup installs it)")
    argv = ["fio", f"--name={name}", f"--filename={target}", "--direct=1", "--ioengine=libaio",
            "--size=96M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--output-format=terse", "--group_reporting",
            "--verify_state_save=0", *extra]  # no state files left in the cwd
    return subprocess.run(argv, capture_output=True, text=True, timeout=900)


def test_fio_verifies_subpage_io_at_depth_on_the_loop_device(make_instance):
    inst = make_instance(size="1G", ram="32M", disk="1G")
    dev = inst.devices[0]
    # not as swap now: the whole device is fio's (the loop device stays attached)
    subprocess.run(["swapoff", dev], check=True, timeout=300)
    p = fio(dev, "subpage", "--rw=randwrite", "--bsrange=512-64k", "--iodepth=32",
            "--numjobs=4", "--offset_increment=128M", "--blockalign=512")
    assert p.returncode == 0, p.stdout + p.stderr
    p = fio(dev, "mixed", "--rw=randrw", "--rwmixread=30", "--bsrange=4k-128k",
            "--iodepth=16", "--numjobs=2", "--offset_increment=256M")
    assert p.returncode == 0, p.stdout + p.stderr
    st = inst.status()
    assert st["io"]["read_errors"] == st["io"]["write_errors"] == 0
    assert st["tiers"][1]["pages"] > 0  # fio's data went through the file tier too


def test_fio_verifies_io_on_the_mounted_file(make_instance):
    inst = make_instance(size="512M", ram="32M", disk="512M")
    dev = inst.devices[0]
    subprocess.run(["swapoff", dev], check=True, timeout=300)
    back = cli("status", "--json", config=inst.config)  # the instance still answers
    assert back.returncode == 0
    mnt_file = f"{inst.run_dir}/shard0/mnt/swap.img"
    p = fio(mnt_file, "file", "--rw=randwrite", "--bsrange=512-32k", "--iodepth=16",
            "--numjobs=2", "--offset_increment=200M", "--blockalign=512")
    assert p.returncode == 0, p.stdout + p.stderr
