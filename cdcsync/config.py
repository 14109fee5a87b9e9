"""Settings: a TOML file plus ``CDCSYNC_<SECTION>__<KEY>`` environment overrides, validated once.

Nothing here reads the environment at import time; :func:`load_settings` is called by the CLI and
the result is handed to whatever needs it. Tests build :class:`Settings` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdcsync.config_file import NAME_RE, SLOT_NAME_RE, TABLE_NAME_RE, TABLE_PATTERN_RE, read_file
from cdcsync.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSettings(_Section):
    dsn: SecretStr
    slot: str = "cdcsync"
    publication: str = "cdcsync"
    decoder: Literal["pgoutput", "wal2json"] = "pgoutput"
    binary: bool = True
    status_interval_s: float = Field(default=10.0, gt=0, le=60)
    heartbeat_interval_s: float = Field(default=10.0, ge=0)
    receive_timeout_s: float = Field(default=60.0, ge=0)
    failover_after_s: float = Field(default=60.0, ge=0)

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, value: str) -> str:
        if not SLOT_NAME_RE.match(value):
            raise ValueError("a slot name is 1-63 lower-case letters, digits or underscores")
        return value

    @field_validator("publication")
    @classmethod
    def _publication_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("a publication name is a plain identifier (letters, digits, _)")
        return value


class TargetSettings(_Section):
    dsn: SecretStr
    pool_size: int = Field(default=4, ge=2, le=64)


class ApplySettings(_Section):
    # "auto": as many as the link to the target needs (see cdcsync.apply.batch_size).
    max_rows: int | Literal["auto"] = "auto"
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_delay_ms: int = Field(default=100, ge=0)
    truncate: Literal["apply", "ignore"] = "apply"
    conflict_column: str = "updated_at"
    on_error: Literal["halt", "dead_letter"] = "halt"
    schema_changes: Literal["add_columns", "halt"] = "add_columns"
    workers: int = Field(default=2, ge=1, le=16)

    @field_validator("max_rows", mode="before")
    @classmethod
    def _rows_or_auto(cls, value: object) -> object:
        # Checked here, not by the union's two branches, so that an error says it once.
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and value >= 1):
            return value
        raise ValueError('give "auto" or a whole number of rows, at least 1')


class RetentionSettings(_Section):
    """How long ``cdcsync.conflicts`` and ``cdcsync.dead_letters`` rows are kept (0: forever)."""

    conflicts_days: float = Field(default=30.0, ge=0)
    dead_letters_days: float = Field(default=30.0, ge=0)
    interval_s: float = Field(default=300.0, gt=0)


class SnapshotSettings(_Section):
    mode: Literal["initial", "never"] = "initial"
    workers: int = Field(default=2, ge=1, le=32)
    chunk_rows: int = Field(default=50_000, ge=1)


class HttpSettings(_Section):
    listen: str = "127.0.0.1:9187"
    ready_lag_s: float = Field(default=30.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, for example 127.0.0.1:9187")
        return value


class AlertSettings(_Section):
    sentry_dsn: SecretStr | None = None
    lag_seconds: float = Field(default=60.0, gt=0)
    retained_wal_bytes: int = Field(default=10 * 2**30, gt=0)
    retained_wal_fraction: float = Field(default=0.8, gt=0, le=1)
    apply_errors: int = Field(default=3, ge=1)
    grace_s: float = Field(default=60.0, ge=0)
    check_interval_s: float = Field(default=10.0, gt=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


class VerifySettings(_Section):
    range_rows: int = Field(default=50_000, ge=100)
    catchup_timeout_s: float = Field(default=60.0, gt=0)
    rechecks: int = Field(default=3, ge=1, le=20)
    interval_s: float = Field(default=0.0, ge=0)
    sample_ranges: int = Field(default=4, ge=1)


class TableOverride(_Section):
    """Per-table options; ``name`` is the source table ``schema.table``."""

    name: str
    target: str | None = None
    conflict_column: str | None = None
    exclude_columns: tuple[str, ...] = ()

    @field_validator("name", "target")
    @classmethod
    def _qualified(cls, value: str | None) -> str | None:
        if value is not None and not TABLE_NAME_RE.match(value):
            raise ValueError("expected schema.table with plain identifiers, e.g. public.orders")
        return value


class Settings(BaseModel):
    """The whole configuration. Built from data only: :func:`load_settings` adds the file and
    the environment, so tests and the demo cannot be redirected by a stray variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tables: tuple[str, ...] = Field(min_length=1)
    table: tuple[TableOverride, ...] = ()
    source: SourceSettings
    target: TargetSettings
    apply: ApplySettings = ApplySettings()
    snapshot: SnapshotSettings = SnapshotSettings()
    retention: RetentionSettings = RetentionSettings()
    http: HttpSettings = HttpSettings()
    alerts: AlertSettings = AlertSettings()
    log: LogSettings = LogSettings()
    verify: VerifySettings = VerifySettings()

    @field_validator("tables")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not TABLE_PATTERN_RE.match(pattern):
                raise ValueError(
                    f"{pattern!r} is not schema.table; use e.g. public.orders or public.*"
                )
        return value

    @field_validator("apply")
    @classmethod
    def _workers_fit_the_pool(cls, value: ApplySettings, info: ValidationInfo) -> ApplySettings:
        target = info.data.get("target")
        if isinstance(target, TargetSettings) and value.workers >= target.pool_size:
            raise ValueError(
                f"workers = {value.workers} needs [target] pool_size of at least "
                f"{value.workers + 1} (each worker holds a target connection while streaming, "
                "and the status, the jobs and the copies' queue need one more): raise "
                "pool_size or lower workers")
        return value

    def override_for(self, qualified: str) -> TableOverride:
        for entry in self.table:
            if entry.name == qualified:
                return entry
        return TableOverride(name=qualified)


class _Environment(BaseSettings):
    """The ``CDCSYNC_<SECTION>__<KEY>`` overrides, as raw data for :class:`Settings`."""

    model_config = SettingsConfigDict(env_prefix="CDCSYNC_", env_nested_delimiter="__",
                                      extra="ignore")

    tables: list[str] | None = None
    table: list[dict[str, Any]] | None = None
    source: dict[str, Any] = {}
    target: dict[str, Any] = {}
    apply: dict[str, Any] = {}
    snapshot: dict[str, Any] = {}
    retention: dict[str, Any] = {}
    http: dict[str, Any] = {}
    alerts: dict[str, Any] = {}
    log: dict[str, Any] = {}
    verify: dict[str, Any] = {}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: Path | None) -> Settings:
    """Read and validate the configuration; every problem becomes one :class:`ConfigError`."""
    data = read_file(path) if path is not None else {}
    try:
        overrides = _Environment().model_dump(exclude_defaults=True)
        return Settings(**_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{where}: remove it or check its spelling")
        elif err["type"] == "missing":
            lines.append(f"missing key {_required_leaf(key)!r}{where}: set it in the file or "
                         f"as {_env_name(_required_leaf(key))}")
        else:
            bad = "<secret>" if "dsn" in key else repr(err.get("input"))
            lines.append(f"bad value for {key!r}{where}: {bad}: {err['msg']}")
    return "configuration error: " + "; ".join(lines)


def _env_name(key: str) -> str:
    return "CDCSYNC_" + "__".join(part.upper() for part in key.split(".") if not part.isdigit())


def _required_leaf(key: str) -> str:
    """For a missing section, its first required key (``target`` becomes ``target.dsn``)."""
    field = Settings.model_fields.get(key)
    section = field.annotation if field is not None else None
    if isinstance(section, type) and issubclass(section, BaseModel):
        for name, inner in section.model_fields.items():
            if inner.is_required():
                return f"{key}.{name}"
    return key
