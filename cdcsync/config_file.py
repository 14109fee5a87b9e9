"""Where the configuration comes from, read as it is: the TOML file, and the environment's raw
``[source]`` and ``[target]`` keys for :mod:`cdcsync.source.early` and
:mod:`cdcsync.target_ahead`.

:mod:`cdcsync.config` validates all of it. This module does not import pydantic, so ``cdcsync
run`` can start the slot's stream and ask the target its first question before pydantic and the
settings' models load (about a fifth of a second); what it reads before validation is only a
guess, which the validated settings confirm or replace.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Final

from cdcsync.errors import ConfigError

# Unquoted PostgreSQL identifiers plus glob characters; anything else is refused rather than quoted,
# so a pattern can never smuggle SQL and always means what it looks like.
NAME_PART: Final = r"[A-Za-z_][A-Za-z0-9_$]*"
_PATTERN_PART: Final = r"[A-Za-z0-9_$*?\[\]-]+"
NAME_RE: Final = re.compile(rf"^{NAME_PART}$")
TABLE_NAME_RE: Final = re.compile(rf"^{NAME_PART}\.{NAME_PART}$")
TABLE_PATTERN_RE: Final = re.compile(rf"^{_PATTERN_PART}\.{_PATTERN_PART}$")
SLOT_NAME_RE: Final = re.compile(r"^[a-z0-9_]{1,63}$")


def config_path(cli_path: str | None) -> Path | None:
    raw = cli_path or os.environ.get("CDCSYNC_CONFIG")
    return Path(raw) if raw else None


def read_file(path: Path) -> dict[str, Any]:
    """The parsed TOML file; a missing or malformed file is a :class:`ConfigError`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"configuration file {path} does not exist",
            fix="pass --config PATH or set CDCSYNC_CONFIG to an existing TOML file",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", fix="correct the syntax") from exc


def raw_section(path: Path | None, name: str) -> dict[str, Any] | None:
    """The file's ``[name]`` table with the ``CDCSYNC_<NAME>__<KEY>`` variables (upper case)
    over it, unvalidated; None where it cannot be read so simply (no such file, bad TOML, not a
    table, or the whole section given as ``CDCSYNC_<NAME>``)."""
    variable = f"CDCSYNC_{name.upper()}"
    if variable in os.environ:
        return None
    try:
        data = read_file(path) if path is not None else {}
    except ConfigError:
        return None
    section = data.get(name, {})
    if not isinstance(section, dict):
        return None
    prefix = f"{variable}__"
    overrides = {key[len(prefix):].lower(): value for key, value in os.environ.items()
                 if key.startswith(prefix)}
    return {**section, **overrides}
