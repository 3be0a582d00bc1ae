# studiohook daemon image: non-root, state in a volume, health checked on /healthz.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STUDIOHOOK_CONFIG=/app/config.toml \
    STUDIOHOOK_STATE_DIR=/var/lib/studiohook \
    STUDIOHOOK_LISTEN=0.0.0.0:8080 \
    STUDIOHOOK_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY handlers ./handlers
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/studiohook --create-home studiohook
COPY config.toml ./config.toml
COPY templates ./templates

USER studiohook
VOLUME ["/var/lib/studiohook"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["studiohook", "serve"]
