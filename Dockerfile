# syntax=docker/dockerfile:1
# cdcsync as a container. Build: docker build -t cdcsync .
# Configure with environment variables only:
#   docker run --env-file cdcsync.env cdcsync
#   (CDCSYNC_TABLES='["public.*"]', CDCSYNC_SOURCE__DSN=..., CDCSYNC_TARGET__DSN=..., ...)
# or mount a TOML file and keep only the secrets in the environment:
#   docker run -v ./cdcsync.toml:/etc/cdcsync/cdcsync.toml:ro \
#     -e CDCSYNC_CONFIG=/etc/cdcsync/cdcsync.toml --env-file secrets.env cdcsync
# Other commands: docker run --env-file cdcsync.env cdcsync setup (or check, status, ...).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/cdcsync
WORKDIR /src
# Dependencies first, read from pyproject.toml alone: editing the code does not rebuild this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/cdcsync/bin/pip install --requirement requirements.txt
# A C compiler, so setup.py compiles the hot modules with mypyc (the image has Python's headers);
# only this stage has it. Unpinned: Debian's stable security updates are wanted here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY README.md setup.py ./
COPY cdcsync ./cdcsync
RUN /opt/cdcsync/bin/pip install --no-deps . \
    && /opt/cdcsync/bin/python -c "import cdcsync.source.tuples as m, cdcsync.source._copybatch, cdcsync.source._staged; assert m.__file__.endswith('.so'), m.__file__" \
    && /opt/cdcsync/bin/cdcsync --version

FROM python:3.11-slim-bookworm
COPY --from=build /opt/cdcsync /opt/cdcsync
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cdcsync
# Numeric, so a runtime that refuses root (runAsNonRoot) can check it without /etc/passwd.
USER 10001:10001
# In a container the probes must be reachable from outside its network namespace.
ENV PATH=/opt/cdcsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CDCSYNC_HTTP__LISTEN=0.0.0.0:9187 \
    CDCSYNC_LOG__FORMAT=json
EXPOSE 9187
# The slim image has no curl: Python's urllib fails on anything but a 2xx from /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CDCSYNC_HTTP__LISTEN', ':9187').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["cdcsync"]
CMD ["run"]
