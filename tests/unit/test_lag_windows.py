"""bench.lag's soak figures: the resident memory's growth rate and the run cut into windows."""

from __future__ import annotations

import math

from bench import lag
from bench.resources import Sample


def _sample(at: float, rss_mb: float, cpu_s: float = 0.0) -> Sample:
    return Sample(at=at, rss_mb=rss_mb, fds=20, threads=9, cpu_s=cpu_s, target_connections=5,
                  retained_wal_mb=at / 10)


def test_the_growth_rate_reads_the_second_half_only() -> None:
    # The first half climbs fast (a working set filling), the second at 1 MB a minute.
    samples = [_sample(t, 50 + 5 * t) for t in range(20)]
    samples += [_sample(t, 150 + (t - 20) / 60) for t in range(20, 60)]
    assert lag.rss_growth_mb_per_h(samples) == 60.0


def test_a_flat_memory_grows_by_nothing_and_too_few_samples_say_nothing() -> None:
    assert lag.rss_growth_mb_per_h([_sample(t, 80) for t in range(30)]) == 0.0
    assert lag.rss_growth_mb_per_h([_sample(t, 80 + t) for t in range(15)]) is None


def test_each_window_holds_the_markers_due_in_it_and_the_daemon_at_its_end() -> None:
    start = 1000.0
    # Markers every 0.5 s over 4 s: 1 to 4 are due in the first window, 5 to 8 in the second.
    delays = {"cdcsync": {n: n / 1000 for n in range(1, 9)},
              "native": {n: 0.001 for n in range(1, 9)}}
    lag_samples = [(start + 0.5, 0.004), (start + 3.0, 0.008)]
    samples = [_sample(start + t, 60 + t, cpu_s=t / 2) for t in range(5)]
    first, second = lag.windows(start, 4.0, 2.0, 0.5, delays=delays, lag=lag_samples,
                                samples=samples)
    assert (first["from_s"], first["to_s"], second["from_s"], second["to_s"]) == (0, 2, 2, 4)
    assert first["cdcsync_marker"]["samples"] == second["cdcsync_marker"]["samples"] == 4
    assert first["cdcsync_marker"]["max_ms"] == 4.0
    assert second["cdcsync_marker"]["p50_ms"] == 6.0
    assert first["cdcsync_lag_metric"]["max_ms"] == 4.0
    assert second["cdcsync_lag_metric"]["max_ms"] == 8.0
    # The first window ends with the sample at 1 s; the last takes the catch-up after 4 s too.
    assert first["daemon"]["rss_mb"] == 61
    assert first["daemon"]["cpu_s"] == 0.5
    assert second["daemon"]["rss_mb"] == 64
    assert second["daemon"]["cpu_s"] == 1.5
    assert second["daemon"]["retained_wal_mb"] == (start + 4) / 10  # the most in the window
    assert not math.isnan(second["native_marker"]["p99_ms"])


def test_without_windows_the_whole_run_is_one() -> None:
    (whole,) = lag.windows(0.0, 60.0, 0.0, 0.05, delays={"cdcsync": {1: 0.002}}, lag=[],
                           samples=[])
    assert (whole["from_s"], whole["to_s"]) == (0, 60)
    assert whole["cdcsync_marker"]["samples"] == 1
    assert "daemon" not in whole
