# Hospital Batch Processor: the service, its migrations and the local directory stand-in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_PATH=/data/batches.db \
    APP_HOST=0.0.0.0 \
    APP_PORT=8000

WORKDIR /app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app app \
    && mkdir /data && chown app:app /data

COPY pyproject.toml README.md config.toml ./
COPY migrations ./migrations
COPY service ./service
RUN pip install --no-compile .

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('APP_PORT', '8000')}/health\", timeout=4)"]
CMD ["python", "-m", "service", "serve"]
