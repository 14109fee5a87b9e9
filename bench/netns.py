"""A host that vanishes: processes in a network namespace whose only link can be cut.

A ``kill -9`` or a stopped server leaves the peer's kernel answering: it resets the connection
or acknowledges its packets. A host that loses power, or a network partition, answers nothing,
and only timeouts find out. Here the process runs in a namespace joined to this host by a veth
pair; ``cut`` takes the namespace's end down, and from then on every packet to or from it is
lost. Namespace ``N`` is the subnet 10.201.N.0/24: this host is .1 there, the namespace .2. The
servers must listen on each namespace's :attr:`Namespace.host_address` (see :func:`expose`).

Needs root (``ip netns``) and the kernel's veth driver; :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from psycopg.conninfo import make_conninfo

from cdcsync import localpg

_SUBNETS = "10.201.0.0/16"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why no namespace can be made here, or None when one can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command is missing (apt-get install -y iproute2)"
    return None


class Namespace:
    """A network namespace reaching this host at :attr:`host_address` over one veth pair."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.host_address = f"10.201.{index}.1"
        self.address = f"10.201.{index}.2"
        # Interface names are limited to 15 bytes.
        self._host_link = f"cdc{os.getpid() % 10**7}h{index}"
        self._link = f"cdc{os.getpid() % 10**7}n{index}"

    def create(self) -> None:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self._host_link, "type", "veth", "peer", "name", self._link)
            _ip("link", "set", self._link, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/24", "dev", self._host_link)
            _ip("link", "set", self._host_link, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", self._link)
            _ip("-n", self.name, "link", "set", self._link, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except RuntimeError:
            self.delete()
            raise

    def delete(self) -> None:
        """Remove the namespace; its end of the pair goes with it, and so does ours."""
        with suppress(RuntimeError):
            _ip("netns", "del", self.name)
        with suppress(RuntimeError):
            _ip("link", "del", self._host_link)

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def cut(self) -> None:
        """Lose every packet to and from the namespace from now on, connections left open."""
        _ip("-n", self.name, "link", "set", self._link, "down")

    def restore(self) -> None:
        _ip("-n", self.name, "link", "set", self._link, "up")


@contextmanager
def namespaces(count: int) -> Iterator[list[Namespace]]:
    """``count`` namespaces, numbered from 1, removed on exit."""
    made: list[Namespace] = []
    try:
        for index in range(1, count + 1):
            ns = Namespace(f"cdcsync-{os.getpid()}-{index}", index)
            ns.create()
            made.append(ns)
        yield made
    finally:
        for ns in made:
            ns.delete()


def expose(cluster: localpg.LocalCluster, spaces: Sequence[Namespace]) -> None:
    """Let ``cluster`` accept connections from ``spaces`` too; it restarts."""
    with (cluster.data_dir / "pg_hba.conf").open("a") as hba:
        hba.write(f"\nhost all all {_SUBNETS} trust\n")
    addresses = ",".join(["127.0.0.1", *(ns.host_address for ns in spaces)])
    with (cluster.data_dir / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"\nlisten_addresses = '{addresses}'\n")
    cluster.restart()


def dsn_from(ns: Namespace, dsn: str) -> str:
    """``dsn`` (to 127.0.0.1) as a process inside ``ns`` reaches the same server."""
    return make_conninfo(dsn, host=ns.host_address)
