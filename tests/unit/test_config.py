"""Configuration: errors name the key, the bad value and the fix; the environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdcsync.config import Settings, load_settings
from cdcsync.dsn import redact, with_session_options
from cdcsync.errors import ConfigError

GOOD = """
tables = ["public.*"]
[source]
dsn = "postgresql://u:s3cret@db:5432/app"
[target]
dsn = "host=t password=s3cret dbname=app"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_names(tmp_path: Path) -> None:
    """A minimal file gets the documented defaults."""
    settings = load_settings(_write(tmp_path, GOOD))
    assert (settings.source.slot, settings.source.publication) == ("cdcsync", "cdcsync")
    assert settings.source.decoder == "pgoutput"
    assert settings.http.listen == "127.0.0.1:9187"
    assert settings.apply.max_rows == "auto"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """An unknown key is refused with its dotted name."""
    with pytest.raises(ConfigError, match=r"unknown key 'apply.max_rowz'"):
        load_settings(_write(tmp_path, GOOD + "[apply]\nmax_rowz = 5\n"))


def test_bad_value_names_key_value_and_form(tmp_path: Path) -> None:
    """A bad value names the key, the value and the expected form."""
    with pytest.raises(ConfigError, match=r"'http.listen'.*'nowhere'.*HOST:PORT"):
        load_settings(_write(tmp_path, GOOD + "[http]\nlisten = 'nowhere'\n"))


@pytest.mark.parametrize("value", ["0", "'many'", "1.5", "true"])
def test_max_rows_is_auto_or_a_whole_number_of_rows(tmp_path: Path, value: str) -> None:
    """One error for the key, not one per form it may take."""
    with pytest.raises(ConfigError, match=r"'apply.max_rows'.*give \"auto\" or a whole number "
                                          r"of rows, at least 1") as caught:
        load_settings(_write(tmp_path, GOOD + f"[apply]\nmax_rows = {value}\n"))
    assert str(caught.value).count("bad value") == 1
    assert load_settings(_write(tmp_path, GOOD + "[apply]\nmax_rows = 'auto'\n")
                         ).apply.max_rows == "auto"


def test_bad_table_pattern(tmp_path: Path) -> None:
    """A table pattern that could smuggle SQL is refused."""
    text = GOOD.replace('"public.*"', '"public.x; drop table y"')
    with pytest.raises(ConfigError, match=r"not schema\.table"):
        load_settings(_write(tmp_path, text))


def test_missing_dsn_says_which_variable(tmp_path: Path) -> None:
    """A missing key names the environment variable that can provide it."""
    with pytest.raises(ConfigError, match="CDCSYNC_TARGET__DSN"):
        load_settings(_write(tmp_path, 'tables = ["a.b"]\n[source]\ndsn = "x"\n'))


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CDCSYNC_<SECTION>__<KEY> overrides the file."""
    monkeypatch.setenv("CDCSYNC_SOURCE__SLOT", "other_slot")
    monkeypatch.setenv("CDCSYNC_APPLY__MAX_ROWS", "77")
    settings = load_settings(_write(tmp_path, GOOD))
    assert settings.source.slot == "other_slot"
    assert settings.apply.max_rows == 77


def test_secrets_not_echoed(tmp_path: Path) -> None:
    """A bad DSN-section value never echoes the secret."""
    text = GOOD.replace("[target]", "[target]\npool_size = 'x'")
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, text))
    assert "s3cret" not in str(caught.value)


def test_redact_both_forms() -> None:
    """Passwords disappear from URL and key=value DSNs and from text that quotes them."""
    assert redact("postgresql://u:s3cret@db/app") == "postgresql://u:***@db/app"
    assert redact("host=x password=s3cret user=u") == "host=x password=*** user=u"
    assert "s3cret" not in redact("failed: password='s3 cret' more")
    assert "s3cret" not in with_session_options("postgresql://u@h/d", "x")


def test_example_config_loads_and_names_every_key() -> None:
    """config/cdcsync.example.toml is valid and documents every key the settings accept."""
    path = Path(__file__).parents[2] / "config" / "cdcsync.example.toml"
    load_settings(path)
    text = path.read_text()
    for section, field in Settings.model_fields.items():
        annotation = field.annotation
        inner = getattr(annotation, "model_fields", None)
        if inner is None:
            continue
        for key in inner:
            documented = (f"\n{key} " in text or f"\n# {key} " in text)
            assert documented, f"{section}.{key} undocumented"


def test_misspelt_environment_key_is_named(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A CDCSYNC_SECTION__KEY variable naming no key is refused like a bad file key."""
    monkeypatch.setenv("CDCSYNC_SOURCE__SLOTT", "x")
    with pytest.raises(ConfigError, match=r"unknown key 'source.slott'"):
        load_settings(_write(tmp_path, GOOD))


def test_settings_built_in_code_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only load_settings reads the environment: settings built in code stay as given."""
    monkeypatch.setenv("CDCSYNC_SOURCE__DSN", "host=elsewhere")
    settings = Settings.model_validate(
        {"tables": ("a.b",), "source": {"dsn": "host=here"}, "target": {"dsn": "x"}})
    assert settings.source.dsn.get_secret_value() == "host=here"


def test_apply_workers_need_a_connection_each_and_one_more(tmp_path: Path) -> None:
    """More workers than the target pool can hold beside the other users is refused, naming
    both keys; the defaults fit."""
    assert load_settings(_write(tmp_path, GOOD)).apply.workers == 2
    text = GOOD.replace("[target]", "[target]\npool_size = 3") + "[apply]\nworkers = 3\n"
    with pytest.raises(ConfigError, match=r"'apply'.*workers = 3 needs \[target\] pool_size of "
                                          r"at least 4.*raise pool_size or lower workers") as err:
        load_settings(_write(tmp_path, text))
    assert "s3cret" not in str(err.value)
