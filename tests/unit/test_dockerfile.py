"""The Dockerfile's promises, read from the file (no Docker engine here; `make check` runs
hadolint on it)."""

from __future__ import annotations

from tests.dockerfile import exec_form, stages


def test_multi_stage_slim_non_root() -> None:
    """A build stage and a slim runtime stage that runs as a numeric non-root user."""
    build, runtime = stages()
    assert build.name == "build" and "slim" in build.base and "slim" in runtime.base
    assert any("--from=build" in args for args in runtime.all("COPY"))
    user = runtime.last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert not any("pip install" in args for args in runtime.all("RUN")), \
        "the runtime stage copies the built venv; it installs nothing"


def test_dependencies_before_code() -> None:
    """Dependencies are installed from pyproject.toml alone, before the code is copied."""
    build = stages()[0]
    steps = [(kw, args) for kw, args in build.instructions if kw in ("COPY", "RUN")]
    deps = next(i for i, (kw, args) in enumerate(steps)
                if kw == "RUN" and "--requirement" in args)
    code = next(i for i, (kw, args) in enumerate(steps)
                if kw == "COPY" and args.startswith("cdcsync"))
    assert deps < code
    assert all(args.split()[0] == "pyproject.toml" for kw, args in steps[:deps] if kw == "COPY")


def test_entrypoint_cmd_and_healthcheck() -> None:
    """ENTRYPOINT cdcsync, CMD run, and a HEALTHCHECK on /healthz with Python's urllib."""
    runtime = stages()[-1]
    assert exec_form(runtime.last("ENTRYPOINT")) == ["cdcsync"]
    assert exec_form(runtime.last("CMD")) == ["run"]
    check = runtime.last("HEALTHCHECK")
    command = exec_form(check[check.index("CMD ") + 4:])
    assert command[0] == "python" and "urllib.request" in command[2]
    assert "/healthz" in command[2]
    env = runtime.env()
    assert env["CDCSYNC_HTTP__LISTEN"].endswith(":9187") and runtime.last("EXPOSE") == "9187"
    assert "CDCSYNC_CONFIG" not in env, "configuration by environment alone must work"

