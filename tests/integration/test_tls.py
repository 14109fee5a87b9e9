"""TLS for real: a CA and a server certificate made here, a cluster serving them, and cdcsync
streaming with sslmode=verify-full on every connection, the replication one included."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdcsync import admin
from cdcsync.config import Settings
from cdcsync.localpg import LocalCluster, TlsFiles, create_cluster, throwaway_dir
from tests.harness import execute, running, table_rows, wait_for


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(cwd: Path, name: str) -> Path:
    """A self-signed CA (EC P-256, fast to make); returns its certificate."""
    _openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN=cdcsync test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cwd / f"{name}.crt"


def _server_cert(cwd: Path, ca: str) -> TlsFiles:
    """A server certificate for 127.0.0.1 and localhost, signed by ``ca``."""
    _openssl(cwd, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (cwd / "san.cnf").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _openssl(cwd, "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", "server.crt", "-days", "2",
             "-extfile", "san.cnf")
    return TlsFiles(cwd / "server.crt", cwd / "server.key")


@dataclass(frozen=True)
class TlsServer:
    cluster: LocalCluster
    ca: Path
    other_ca: Path

    def dsn(self, dbname: str, ca: Path | None = None) -> str:
        return make_conninfo(self.cluster.dsn(dbname), sslmode="verify-full",
                             sslrootcert=str(ca or self.ca))


@pytest.fixture(scope="module")
def server() -> Iterator[TlsServer]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make certificates")
    with throwaway_dir() as base:
        certs = base / "certs"
        certs.mkdir()
        ca = _ca(certs, "ca")
        other = _ca(certs, "other")
        cluster = create_cluster(base, "tls", logical=True, tls=_server_cert(certs, "ca"))
        try:
            execute(cluster.dsn(), "CREATE DATABASE src", "CREATE DATABASE tgt")
            yield TlsServer(cluster, ca, other)
        finally:
            cluster.destroy()


def _settings(server: TlsServer, ca: Path | None = None) -> Settings:
    return Settings.model_validate({
        "tables": ("public.*",),
        "source": {"dsn": server.dsn("src", ca), "slot": "tls", "publication": "tls"},
        "target": {"dsn": server.dsn("tgt", ca)},
        "apply": {"max_delay_ms": 50}, "http": {"listen": "127.0.0.1:0"}})


def test_verify_full_streams_over_tls(server: TlsServer) -> None:
    """setup and run with sslmode=verify-full: the target equals the source, and every cdcsync
    connection to the server, the walsender's included, is encrypted."""
    settings = _settings(server)
    execute(server.dsn("src"), "CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.setup(settings, create_tables=True)
    with running(settings) as runner:
        execute(server.dsn("src"), "INSERT INTO t SELECT g, md5(g::text) FROM "
                                   "generate_series(1, 500) g", "UPDATE t SET v = 'x' "
                                   "WHERE id <= 10", "DELETE FROM t WHERE id > 490")
        wait_for(lambda: table_rows(server.dsn("src"), "public.t")
                 == table_rows(server.dsn("tgt"), "public.t"), runner=runner, what="converged")
        seen: list[tuple[str, bool]] = []

        def streaming() -> bool:
            # The snapshot alone may have converged the target before the stream started.
            with psycopg.connect(server.dsn("postgres")) as conn:
                seen[:] = conn.execute(
                    "SELECT a.backend_type, s.ssl FROM pg_stat_activity a "
                    "JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'cdcsync%'"
                ).fetchall()
            return any(kind == "walsender" for kind, _ in seen)

        wait_for(streaming, runner=runner, what="the stream's walsender")
    assert ("walsender", True) in seen
    assert ("client backend", True) in seen
    assert all(ssl for _, ssl in seen), seen
    assert len(table_rows(server.dsn("tgt"), "public.t")) == 490


def test_wrong_ca_is_refused_with_the_fix(server: TlsServer) -> None:
    """A certificate from another CA fails verification: check says so and names the side."""
    report = admin.check(_settings(server, ca=server.other_ca))
    failures = [(what, detail) for status, what, detail in report.lines if status == "FAIL"]
    assert [what for what, _ in failures] == ["source reachable", "target reachable"]
    assert all("certificate verify failed" in detail and
               "fix: check sslmode and sslrootcert in the" in detail for _, detail in failures)
