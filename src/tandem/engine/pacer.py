"""The resync rate controller: resync as fast as allowed, but not at the VM's expense.

Resync data and application writes share the link (and, on the target, the
disk). Each tick the controller compares the average latency of the
application writes completed in that tick with a target derived from their
latency before the resync began: above it, the resync rate halves (down to
resync_rate_min, so a resync always finishes); below it, the rate grows by
a quarter (up to resync_rate_max). Ticks without application writes count
as "below": an idle VM gets the full rate. This is additive-increase /
multiplicative-decrease in spirit, as TCP does, and plays the role of
DRBD's dynamic resync controller (c-plan-ahead, c-fill-target,
c-min-rate), which steers by data in flight rather than latency.
"""

from __future__ import annotations

TICK = 0.1                  # seconds between adjustments
#: Foreground latency may rise to this multiple of its pre-resync level ...
SLOWDOWN = 2.0
#: ... and to at least this, so a very fast baseline does not starve the resync.
FLOOR_US = 2000.0


class ResyncPacer:
    def __init__(self, rate_min: float, rate_max: float, baseline_us: float):
        self.rate_min = rate_min
        self.rate_max = rate_max
        self.target_us = max(SLOWDOWN * baseline_us, FLOOR_US)
        self.rate = rate_max
        self.backoffs = 0

    def tick(self, latency_sum_us: float, writes: int) -> float:
        """Feed one tick's foreground writes (sum of latencies, count); returns the new rate."""
        if writes and latency_sum_us / writes > self.target_us:
            self.rate = max(self.rate_min, self.rate / 2)
            self.backoffs += 1
        else:
            self.rate = min(self.rate_max, self.rate * 1.25)
        return self.rate
