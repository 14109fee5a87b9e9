"""bench.wan on its own throwaway clusters: each backlog size is drained by both consumers through
the relays, both targets end equal to the source, and each size gets its own summary."""

from __future__ import annotations

import json

import pytest

from bench import wan


def test_each_backlog_size_is_drained_by_both_consumers_and_summarised(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = wan.main(["--rows", "600", "1200", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert [s["changes"] for s in report["summaries"]] == [592, 1192]
    assert all(s["verified"] and s["runs"] == 1 for s in report["summaries"])
    assert [r["changes"] for r in report["runs"]] == [592, 1192]
    for summary, run in zip(report["summaries"], report["runs"], strict=True):
        assert run["verified"]
        assert summary["ratio"] == run["ratio"] > 0
        assert summary["cdcsync_ahead"] == (run["ratio"] >= 1)
        assert 0 < run["cdcsync_first_apply_s"] <= run["cdcsync_s"]
        assert run["cdcsync_batches"] >= 1
