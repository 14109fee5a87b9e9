"""bench.wan on its own throwaway clusters: each backlog size is drained by both consumers through
the relays, both targets end equal to the source, and each size gets its own summary; with the
backlog written while both run and their relays stall, each catches up once its relay resumes."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench import wan
from bench.relay import Relay
from tests.conftest import DbPair


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


def test_a_backlog_written_while_the_links_stall_is_caught_up_from_their_return(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = wan.main(["--rows", "600", "--backlog-during", "stall", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["backlog_during"] == "stall"
    (run,) = report["runs"]
    # The bench fails if either consumer applied part of the backlog while its link stalled.
    assert run["verified"] and run["backlog_during"] == "stall"
    for consumer in ("native", "cdcsync"):
        # Timed from the link's return, with the slot held throughout: no start in it.
        assert run[f"{consumer}_drain_s"] == run[f"{consumer}_s"] > 0
        assert 0 < run[f"{consumer}_first_apply_s"] <= run[f"{consumer}_s"]


def test_a_stalled_relay_holds_a_query_until_it_resumes(dbpair: DbPair) -> None:
    port = int(str(conninfo_to_dict(dbpair.target_dsn)["port"]))
    answered = threading.Event()
    with Relay(port, 0.0) as relay, psycopg.connect(make_conninfo(
            dbpair.target_dsn, host="127.0.0.1", port=relay.port), autocommit=True) as conn:
        relay.stall()

        def ask() -> None:
            conn.execute("SELECT 1")
            answered.set()

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        assert not answered.wait(0.5)
        relay.resume()
        assert answered.wait(10)
        asking.join(timeout=10)
