"""A byte-rate limit for background repair traffic (rebuilds, resyncs, re-replication).

Repair competes with swap for the targets' bandwidth, and a returning target can have
gigabytes to catch up on; without a limit the first minutes after a target returns would
starve foreground swap-ins on the same network. Token bucket: bursts up to one second's
worth, then `rate` bytes per second. (policy.TokenBucket is the same idea for moves between
tiers; this one lives with the tiers so they do not import the policy engine.)
"""

from __future__ import annotations

import trio


class ByteRate:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._t: float | None = None  # set on first use: created outside trio is fine

    async def take(self, nbytes: int) -> None:
        """Account `nbytes` about to be sent; sleeps while over the rate."""
        now = trio.current_time()
        if self._t is not None:
            self._tokens = min(float(self.rate), self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= nbytes
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
