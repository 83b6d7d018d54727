"""tierswap.system against scripted tools: the races of two swapoffs of one device, and
what losetup prints.

For swapoff, the kernel's behaviour scripted here: while one swapoff(2) of a device runs,
/proc/swaps still lists it and a second swapoff(2) of it fails at once with EINVAL; when the
first fails (ENOMEM), the device is writable swap again.
"""

from __future__ import annotations

import pytest

from tierswap import system
from tierswap.errors import CommandError

DEV = "/dev/loop7"


class Kernel:
    """/proc/swaps and swapoff(8) for one device whose other swapoff ends after `busy` polls."""

    def __init__(self, busy: int, other_fails: bool = False) -> None:
        self.busy = busy
        self.other_fails = other_fails
        self.listed = True
        self.calls: list[list[str]] = []

    def active_swaps(self) -> dict[str, dict[str, int]]:
        return {DEV: {"used": 0}} if self.listed else {}

    def run(self, argv: list[str], timeout: float = 60.0, check: bool = True,
            env: dict[str, str] | None = None) -> str:
        assert env is not None and env["LC_ALL"] == "C"  # the errno text is parsed
        self.calls.append(argv)
        if self.busy > 0:  # the other swapoff is still pulling pages back
            self.busy -= 1
            if self.busy == 0 and not self.other_fails:
                self.listed = False
            raise CommandError(f"swapoff {DEV}: swapoff: {DEV}: swapoff failed: Invalid argument")
        self.listed = False  # ours ran to the end
        return ""


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    def make(**kw) -> Kernel:
        k = Kernel(**kw)
        monkeypatch.setattr(system, "active_swaps", k.active_swaps)
        monkeypatch.setattr(system, "run", k.run)
        return k
    return make


def test_a_second_swapoff_waits_for_the_first_to_end(kernel) -> None:
    k = kernel(busy=3)
    system.swapoff(DEV, poll=0)
    assert not k.listed and len(k.calls) == 3


def test_when_the_other_swapoff_fails_ours_runs_again(kernel) -> None:
    k = kernel(busy=2, other_fails=True)
    system.swapoff(DEV, poll=0)
    assert not k.listed and len(k.calls) == 3  # two refused while busy, then ours


def test_a_real_failure_is_raised_at_once(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel(busy=0)

    def enomem(argv, timeout=60.0, check=True, env=None):
        k.calls.append(argv)
        raise CommandError(f"swapoff {DEV}: swapoff: {DEV}: swapoff failed: "
                           "Cannot allocate memory")
    monkeypatch.setattr(system, "run", enomem)
    with pytest.raises(CommandError, match="Cannot allocate memory"):
        system.swapoff(DEV, poll=0)
    assert len(k.calls) == 1 and k.listed


def test_waiting_for_another_swapoff_is_bounded(kernel) -> None:
    kernel(busy=10**9)
    with pytest.raises(CommandError, match="another swapoff of it still runs"):
        system.swapoff(DEV, timeout=0.05, poll=0.01)


def test_a_device_not_in_swap_runs_nothing(kernel) -> None:
    k = kernel(busy=0)
    k.listed = False
    system.swapoff(DEV)
    assert k.calls == []


def test_loop_list_gives_device_numbers_without_losetups_padding(monkeypatch) -> None:
    """losetup pads BACK-MAJ:MIN in JSON too; unstripped, a FUSE file's "0:52" never matched
    mountinfo's and abort_fuse(majmin=) never found the connection (down --force after a
    lazy unmount)."""
    out = ('{"loopdevices": [{"name": "/dev/loop2", "back-file": "/x/swap.img", '
           '"back-maj:min": "     0:52  "}]}')
    monkeypatch.setattr(system, "run", lambda argv, **kw: out)
    assert system.loop_list() == [
        {"name": "/dev/loop2", "back-file": "/x/swap.img", "back-maj:min": "0:52"}]
    assert system.loop_backing_dev("/dev/loop2") == "0:52"
