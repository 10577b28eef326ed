"""docker-compose.yml cannot run here (no Docker): check that it is complete and wired from .env."""

from __future__ import annotations

import re
import yaml

from pipeline.settings import PROJECT_ROOT

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
REQUIRED_SERVICES = {
    "seaweedfs", "postgres", "redis", "mlflow", "serving", "airflow-init", "airflow-api-server",
    "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
}
# ${VAR}, ${VAR:-default}, ${VAR?err}; `$$` is an escaped dollar for the container's shell.
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?-][^}]*)?\}")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _documented() -> set[str]:
    return set(re.findall(r"^([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.M))


def test_every_variable_used_is_documented_in_env_example():
    used = set(VAR_RE.findall(COMPOSE.read_text()))
    assert used, "docker-compose.yml uses no variables: it is not wired from .env"
    missing = sorted(used - _documented())
    assert not missing, f"variables used in docker-compose.yml but missing from .env.example: {missing}"


def test_every_build_context_and_dockerfile_exists():
    builds = [(name, svc["build"]) for name, svc in _compose()["services"].items() if "build" in svc]
    assert {"mlflow", "serving", "airflow-scheduler"} <= {n for n, _ in builds}
    for name, build in builds:
        context = (PROJECT_ROOT / build["context"]).resolve()
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


def test_all_services_present_and_workers_scale():
    services = _compose()["services"]
    assert REQUIRED_SERVICES <= set(services)
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale airflow-worker=N
    assert worker["command"] == ["celery", "worker", "--queues", "default"]
    assert worker["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    trainer = services["airflow-worker-training"]  # TRAIN_QUEUE's own worker, off unless its profile is on
    assert trainer["profiles"] == ["training-worker"] and "${TRAIN_QUEUE}" in trainer["command"]


def test_mounted_files_exist_and_host_ports_are_loopback_only():
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (PROJECT_ROOT / source).exists(), f"{name}: mounted {source} does not exist"
                if "docker-entrypoint-initdb.d" in volume:
                    assert (PROJECT_ROOT / source).stat().st_mode & 0o111, f"{source} is not executable"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_services_use_in_network_endpoints_not_loopback():
    services = _compose()["services"]
    for name in ("airflow-worker", "serving"):
        env = services[name]["environment"]
        assert env["S3_ENDPOINT_URL"] == "http://seaweedfs:8333", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
    assert any("postgresql" in str(arg) for arg in services["mlflow"]["command"])
    assert any(str(arg).startswith("--artifacts-destination=s3://") for arg in services["mlflow"]["command"])

