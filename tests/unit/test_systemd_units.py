"""The systemd units carry the properties a notify daemon with secrets needs (parsed, no systemd);
`systemd-analyze verify` itself runs in .ci/verify-units."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value in order (systemd keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("name", ["cdcsync.service", "cdcsync@.service"])
def test_unit_properties(name: str) -> None:
    """Type=notify with a watchdog, restart on failure, secrets from a file, hardening, and a stop
    timeout longer than the daemon's 10 s graceful shutdown."""
    service = parse_unit(UNITS / name)["Service"]
    single = {key: values[-1] for key, values in service.items()}
    assert single["Type"] == "notify"
    assert _seconds(single["WatchdogSec"]) >= 30
    assert single["Restart"] == "on-failure"
    assert _seconds(single["TimeoutStopSec"]) > 10
    assert single["EnvironmentFile"].endswith(".env")
    assert single.get("DynamicUser") == "yes" or single.get("User") not in (None, "root")
    expected = {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
        "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
    }
    assert {k: single.get(k) for k in expected} == expected
    assert "@system-service" in service["SystemCallFilter"]
    # The notify socket is AF_UNIX: without it READY=1 could never reach systemd.
    assert "AF_UNIX" in single["RestrictAddressFamilies"].split()


def test_template_runs_one_configuration_per_instance() -> None:
    """cdcsync@NAME.service reads /etc/cdcsync/NAME.toml and NAME.env; the rest matches the
    single unit."""
    single = parse_unit(UNITS / "cdcsync.service")
    template = parse_unit(UNITS / "cdcsync@.service")
    assert template["Service"]["ExecStart"] == [
        "/usr/local/bin/cdcsync --config /etc/cdcsync/%i.toml run"]
    assert template["Service"]["EnvironmentFile"] == ["/etc/cdcsync/%i.env"]
    differing = {k for k in single["Service"] if single["Service"][k] != template["Service"][k]}
    assert differing == {"ExecStart", "EnvironmentFile"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (.ci/run installs it)")
def test_systemd_analyze_verify() -> None:
    """systemd itself accepts both units without a warning."""
    result = subprocess.run(["bash", str(ROOT / ".ci" / "verify-units")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
