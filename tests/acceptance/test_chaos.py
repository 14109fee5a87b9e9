"""Every kind of fault, three times each, at random moments under a continuous workload.

The bounded version of ``python -m bench.chaos``: after each fault the daemon must catch up on
its own (no restart other than the one the fault itself is), and no difference ``cdcsync verify``
reports may persist once the writers pause; with the workload stopped, a last verify must find
none at all. The target hang and the stall of the link to the source are shorter than in the
benchmark to keep the suite fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.chaos import (
    KINDS,
    SCHEMA,
    TABLES,
    Chaos,
    DaemonProcess,
    Workload,
    daemon_source,
    daemon_target,
)
from bench.relay import Relay
from tests.conftest import DbPair
from tests.harness import cli, execute, settings_for, write_config

pytestmark = pytest.mark.slow

PER_KIND = 3
HANG_S = 3.0


def test_faults_of_every_kind_leave_the_target_equal_to_the_source(
        dbpair: DbPair, tmp_path: Path) -> None:
    if dbpair.source_cluster is None or dbpair.target_cluster is None:
        pytest.skip("needs the throwaway clusters: the test stops and pauses the servers")
    execute(dbpair.source_dsn, SCHEMA)
    with Relay(dbpair.source_cluster.port, 0.0) as link, \
            Relay(dbpair.target_cluster.port, 0.0) as target_link:
        config = write_config(tmp_path / "cdcsync.toml", dbpair, tables=TABLES,
                              source=daemon_source(dbpair.source_dsn, link, HANG_S),
                              target_dsn=daemon_target(dbpair.target_dsn, target_link))
        setup = cli("setup", "--create-tables", config=config)
        assert setup.returncode == 0, setup.stderr
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        workload = Workload(dbpair.source_dsn)
        workload.start()
        daemon.start()
        chaos = Chaos(settings_for(dbpair, tables=TABLES), daemon, dbpair.source_cluster,
                      dbpair.target_cluster, link, target_link=target_link, hang_s=HANG_S,
                      catchup_timeout_s=90.0, gap_s=(0.1, 0.8))
        try:
            report = chaos.run(PER_KIND, workload)
        finally:
            workload.close()
            stopped = daemon.stop()
    summary = report.summary()
    detail = json.dumps(summary, indent=1) + "\n" + daemon.log_tail(20)
    assert summary["needed_human"] == [], detail
    assert summary["differences_persisting"] == 0, detail
    assert summary["final_differences"] == 0, detail
    assert summary["daemon_exits"] == [], detail
    assert report.survived() == dict.fromkeys(KINDS, PER_KIND), detail
    assert all(f.rows_compared > 100 for f in report.faults), [asdict(f) for f in report.faults]
    assert report.transactions > 100
    assert stopped == 0, daemon.log_tail(20)
