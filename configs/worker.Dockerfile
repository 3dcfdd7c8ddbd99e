# A tfpool worker host: TensorFlow, tfpool, and `tfpool serve` as the entry point.
#
#   docker build -f configs/worker.Dockerfile -t tfpool-worker .
#   docker run --gpus all -v /models:/models \
#     -e TFPOOL_MODEL=/models/resnet50 -e TFPOOL_REDIS_URL=redis://redis-0:6379 \
#     -e TFPOOL_CLUSTER=1 tfpool-worker
#
# Every option comes from the environment (TFPOOL_<OPTION>) or a mounted TOML file
# (`--config /etc/tfpool/pool.toml`). The GPU image; tensorflow/tensorflow:2.17.0 for CPU.
FROM tensorflow/tensorflow:2.17.0-gpu

WORKDIR /opt/tfpool
COPY pyproject.toml README.md ./
COPY queueing ./queueing
COPY workers ./workers
# TensorFlow comes with the base image; tfpool's worker extra adds psutil and pillow.
RUN pip install --no-cache-dir ".[worker]"

# Run as a user, not root.
RUN useradd --create-home tfpool
USER tfpool

# SIGTERM drains (finish and answer what is in hand); Kubernetes sends it, then waits
# terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
# The supervisor's HTTP endpoint: /metrics, /healthz (liveness), /readyz (readiness).
ENV TFPOOL_METRICS_PORT=9100
EXPOSE 9100
HEALTHCHECK CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/healthz', timeout=5)"]
ENTRYPOINT ["tfpool", "serve"]
