"""The rows a batch merges: fixed by ``[apply] max_rows``, or with "auto" scaled by the shortest
recent wait for a batch's COPY to start, between a floor and a cap."""

from __future__ import annotations

import threading

from cdcsync.apply.batch_size import CAP, FLOOR, RECENT, ROWS_PER_MS, BatchSize, rows_for


def test_auto_starts_at_the_floor_and_scales_with_the_round_trip_between_floor_and_cap() -> None:
    size = BatchSize("auto")
    assert size.rows() == FLOOR and size.round_trip_s is None
    size.copy_waited(0.0004)
    assert size.rows() == FLOOR
    size.copy_waited(0.050)  # a busy moment: the shortest recent wait counts
    assert size.rows() == FLOOR and size.round_trip_s == 0.0004
    assert rows_for(0.010) == 10 * ROWS_PER_MS
    assert rows_for(FLOOR / ROWS_PER_MS / 1000 / 2) == FLOOR
    assert rows_for(0.080) == CAP
    assert FLOOR < rows_for(0.010) < CAP


def test_auto_follows_a_link_that_slows_down_once_the_fast_waits_are_no_longer_recent() -> None:
    size = BatchSize("auto")
    size.copy_waited(0.001)
    for _ in range(RECENT - 1):
        size.copy_waited(0.015)
    assert size.rows() == FLOOR
    size.copy_waited(0.015)
    assert size.round_trip_s == 0.015 and size.rows() == rows_for(0.015) == 45_000


def test_a_configured_number_of_rows_stays_whatever_the_waits() -> None:
    size = BatchSize(500)
    for wait in (0.0001, 0.040, 0.200):
        size.copy_waited(wait)
    assert size.rows() == 500 and size.round_trip_s == 0.0001


def test_the_lanes_threads_may_report_waits_together() -> None:
    size = BatchSize("auto")

    def report(wait: float) -> None:
        for _ in range(1000):
            size.copy_waited(wait)

    threads = [threading.Thread(target=report, args=(w,)) for w in (0.012, 0.020, 0.030)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert size.round_trip_s is not None and size.round_trip_s >= 0.012
    assert size.rows() == rows_for(size.round_trip_s)
