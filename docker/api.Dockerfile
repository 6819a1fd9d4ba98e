# The API (and Flower): light, no torch.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements-api.txt .
RUN pip install -r requirements-api.txt
COPY api/ api/
COPY common/ common/
RUN useradd --system --uid 10001 sdq && mkdir -p /data && chown sdq /data
USER sdq
EXPOSE 8000
# gthread: long-polling readers (?wait=) each hold a thread, not a process.
# api/gunicorn_conf.py: JSON logs, and Prometheus multiprocess files in PROMETHEUS_MULTIPROC_DIR
# (emptied at start, a temporary folder when unset; each gunicorn process writes its own, /metrics
# sums them). Not an ENV here: Flower runs from this image and must not inherit it.
CMD ["sh", "-c", "exec gunicorn -c api/gunicorn_conf.py 'api:create_app()' --bind 0.0.0.0:8000 --workers ${SDQ_API_WORKERS:-2} --worker-class gthread --threads ${SDQ_API_THREADS:-224} --timeout 120 --graceful-timeout 30 --access-logfile -"]
