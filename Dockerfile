# syntax=docker/dockerfile:1
# Build: docker build -t cdcsync .   Run: docker run --env-file cdcsync.env -v ./cdcsync.toml:/etc/cdcsync/cdcsync.toml cdcsync
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/cdcsync
# Dependencies first, so code changes do not invalidate the dependency layer.
COPY pyproject.toml README.md ./
RUN mkdir cdcsync && touch cdcsync/__init__.py \
    && /opt/cdcsync/bin/pip install --no-cache-dir . \
    && /opt/cdcsync/bin/pip uninstall -y cdcsync
COPY cdcsync ./cdcsync
RUN /opt/cdcsync/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
COPY --from=build /opt/cdcsync /opt/cdcsync
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin cdcsync
USER cdcsync
ENV PATH=/opt/cdcsync/bin:$PATH \
    CDCSYNC_CONFIG=/etc/cdcsync/cdcsync.toml \
    PYTHONUNBUFFERED=1
EXPOSE 9187
ENTRYPOINT ["cdcsync"]
CMD ["run"]
