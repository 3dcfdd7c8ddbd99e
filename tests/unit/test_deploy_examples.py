"""The deployment examples under configs/ parse, and say what tfpool needs to run."""

from __future__ import annotations

from pathlib import Path

import yaml

from workers.config import option_types

CONFIGS = Path(__file__).parents[2] / "configs"


def test_the_kubernetes_manifest_runs_worker_hosts_on_gpus_against_a_cluster() -> None:
    documents = list(yaml.safe_load_all((CONFIGS / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"ConfigMap", "Deployment"}
    settings = kinds["ConfigMap"]["data"]
    assert settings["TFPOOL_CLUSTER"] == "1"
    # Every variable is an option tfpool reads (a typo would be silently ignored).
    assert {k.removeprefix("TFPOOL_").lower() for k in settings} <= set(option_types())
    (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["envFrom"][0]["configMapRef"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    # The probes ask the supervisor's HTTP endpoint, on the port the pool is told to use.
    (port,) = container["ports"]
    assert port["containerPort"] == int(settings["TFPOOL_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}


def test_the_worker_image_serves_a_pool() -> None:
    lines = [
        line.strip()
        for line in (CONFIGS / "worker.Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = {line.split()[0] for line in lines}
    assert lines[0].startswith("FROM tensorflow/tensorflow:")
    assert {"COPY", "RUN", "USER", "ENTRYPOINT"} <= instructions
    assert lines[-1] == 'ENTRYPOINT ["tfpool", "serve"]'
    assert "ENV TFPOOL_METRICS_PORT=9100" in lines
    assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)
