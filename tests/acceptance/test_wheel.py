"""`python -m build` makes a wheel that runs on its own: SQL files included, version from the
package metadata."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import cdcsync

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(*command: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    """The wheel carries the SQL files; installed alone into a fresh venv (dependencies seen
    through a .pth, so no download), `cdcsync --version`, `check --help` and the SQL work."""
    # A clean copy: an in-tree build/ left by an earlier build could slip stale files in.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "cdcsync", source / "cdcsync",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # --no-isolation: the dev extras carry the build backend, so no download is needed.
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
         tmp_path / "dist", source, cwd=source)
    (wheel,) = (tmp_path / "dist").glob("cdcsync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cdcsync/sql/metadata.sql", "cdcsync/py.typed", "cdcsync/cli.py"} <= names
    assert not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         wheel, cwd=tmp_path)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=tmp_path).strip())
    # The current venv's site-packages, appended after the fresh venv's own: its editable
    # cdcsync is not reachable that way (a path added by a .pth has its own .pth files ignored).
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    _run(sys.executable, "-m", "pip", "--python", python, "check", cwd=tmp_path)

    cli = venv / "bin" / "cdcsync"
    version = _run(cli, "--version", cwd=tmp_path).strip()
    assert version == f"cdcsync {cdcsync.__version__}" and "unknown" not in version
    assert "usage: cdcsync check" in _run(cli, "check", "--help", cwd=tmp_path)
    where = _run(python, "-c", "import cdcsync, cdcsync.checkpoint as c; "
                 "print(cdcsync.__file__); print(len(c.metadata_sql()))", cwd=tmp_path).split()
    assert Path(where[0]).is_relative_to(venv), "cdcsync imported from outside the wheel"
    assert int(where[1]) > 100
