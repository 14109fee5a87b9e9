"""bench.lag on its own throwaway clusters, cut into windows: every marker lands in one, and each
window tells what the running daemon held at its end, with its periodic jobs running often."""

from __future__ import annotations

import json

import pytest

from bench import lag


def test_a_short_soak_reports_each_window_and_what_the_daemon_held(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = lag.main(["--duration", "4", "--rate", "1000", "--window-s", "2",
                     "--jobs-interval-s", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (run,) = json.loads(out)["runs"]
    assert [(w["from_s"], w["to_s"]) for w in run["windows"]] == [(0, 2), (2, 4)]
    assert sum(w["cdcsync_marker"]["samples"] for w in run["windows"]) == run["markers"]
    assert sum(w["native_marker"]["samples"] for w in run["windows"]) == run["markers"]
    for window in run["windows"]:
        held = window["daemon"]
        assert held["rss_mb"] > 20
        assert held["threads"] >= 3
        assert held["fds"] >= held["target_connections"] >= 3  # the workers, the lock, the jobs
        assert held["cpu_s"] >= 0
    first, last = run["cdcsync_daemon_first"], run["cdcsync_daemon_last"]
    assert last["cpu_s"] > first["cpu_s"]
    assert last["retained_wal_mb"] >= 0
