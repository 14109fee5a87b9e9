"""bench.merge_sql against the test target: every statement it times changes the rows it must
(the bench refuses a round where one does not), and it reports each one."""

from __future__ import annotations

import json

import pytest

from bench import merge_sql
from tests.conftest import Servers


def test_each_statement_is_timed_on_rows_it_really_changes(
        clusters: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    code = merge_sql.main(["--target-dsn", clusters.target_dsn, "--rows", "1500",
                           "--batch-rows", "100", "--rounds", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    per_row = json.loads(out)["per_row"]
    assert set(per_row) == set(merge_sql.STATEMENTS)
    assert all(f["median_us"] > 0 and f["fastest_us"] <= f["median_us"] for f in per_row.values())
