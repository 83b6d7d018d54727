"""Shared test configuration.

Integration tests (marker `integration`) skip only when a capability is missing (root,
/dev/fuse, loop devices, a memory cgroup). With TIERSWAP_REQUIRE_INTEGRATION=1, which
.ci/run sets, such a skip is turned into a failure: CI runs on a machine that has them all.
"""

from __future__ import annotations

import os

import pytest

REQUIRE = os.environ.get("TIERSWAP_REQUIRE_INTEGRATION") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE and report.skipped and item.get_closest_marker("integration") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"integration test skipped but TIERSWAP_REQUIRE_INTEGRATION=1: {reason}"
