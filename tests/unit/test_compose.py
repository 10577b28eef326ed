"""docker-compose.yml cannot run here (no Docker): check that it is complete, wired from .env,
least-privileged (each service gets exactly its secrets), ordered (nothing with a secret starts
before the secrets check), and that its images and volumes would come up cleanly."""

from __future__ import annotations

import re

import yaml

from contracts.credentials import GENERATED_NAMES
from contracts.settings import PROJECT_ROOT, Settings

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
REQUIRED_SERVICES = {
    "seaweedfs", "postgres", "redis", "mlflow", "serving", "airflow-init", "airflow-api-server",
    "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "secrets-check",
    "s3-init", "mlflow-users",
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
    assert services["airflow-worker"]["environment"]["S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    for name in ("airflow-worker", "serving", "mlflow-users"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
    assert "postgresql" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert any(str(arg).startswith("--artifacts-destination=s3://") for arg in services["mlflow"]["command"])


# --- least privilege, start-up order, volumes, build context (issue 11) ---------------------------
# Secret variables (generated per install); usernames and the pinned public keys are not secret.
SECRETS = (set(GENERATED_NAMES) | {"SERVING_API_KEYS"}) - {
    "MLFLOW_TRACKING_USERNAME", "SERVING_MLFLOW_USERNAME", "SERVING_S3_ACCESS_KEY_ID", "BUNDLE_TRUSTED_PUBLIC_KEYS"}
AIRFLOW_SHARED = {"POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY"}
EXPECTED_SECRETS = {
    "secrets-check": SECRETS,
    "seaweedfs": {"AWS_SECRET_ACCESS_KEY", "SERVING_S3_SECRET_ACCESS_KEY"},
    "s3-init": {"AWS_SECRET_ACCESS_KEY"},
    "postgres": {"POSTGRES_PASSWORD"},
    "redis": set(),
    "mlflow": {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"},
    "mlflow-users": {"MLFLOW_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "SERVING_MLFLOW_PASSWORD"},
    "airflow-init": AIRFLOW_SHARED,
    "airflow-api-server": AIRFLOW_SHARED,
    "airflow-scheduler": AIRFLOW_SHARED,
    "airflow-dag-processor": AIRFLOW_SHARED,
    "airflow-triggerer": AIRFLOW_SHARED,
    "airflow-worker": AIRFLOW_SHARED | {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "BUNDLE_SIGNING_KEY",
                                        "SERVING_ADMIN_API_KEYS"},
    "airflow-worker-training": AIRFLOW_SHARED | {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                                                 "BUNDLE_SIGNING_KEY", "SERVING_ADMIN_API_KEYS"},
    "serving": {"SERVING_MLFLOW_PASSWORD", "SERVING_ADMIN_API_KEYS", "SERVING_API_KEYS", "SERVING_REVIEWER_API_KEYS",
                "SERVING_S3_SECRET_ACCESS_KEY"},
}
# Everything serving may see: its own settings, MLflow read-only access, the pinned keys, image limits.
SERVING_ENV = {
    "HEMAFLOW_ENV_FILE", "HEMAFLOW_SECRETS_FILE", "INSECURE_DEMO_SECRETS", "SERVING_HOST", "SERVING_PORT",
    "MLFLOW_TRACKING_URI", "SERVING_MLFLOW_USERNAME", "SERVING_MLFLOW_PASSWORD", "BUNDLE_TRUSTED_PUBLIC_KEYS",
    "DATASET", "MODEL_NAME_PREFIX", "SERVING_POLL_INTERVAL_S", "SERVING_ADMIN_API_KEYS", "SERVING_REQUIRE_API_KEY",
    "SERVING_API_KEYS", "SERVING_REVIEWER_API_KEYS", "SERVING_MAX_UPLOAD_BYTES", "SERVING_MAX_BATCH", "SERVING_MICRO_BATCH", "INFERENCE_TTA", "ALLOWED_FORMATS",
    "MIN_IMAGE_SIDE", "MAX_IMAGE_SIDE", "MAX_IMAGE_PIXELS",
    "S3_ENDPOINT_URL", "S3_BUCKET", "S3_REGION", "SERVING_S3_ACCESS_KEY_ID", "SERVING_S3_SECRET_ACCESS_KEY",
}
# Settings the Airflow workers do not get (serving's, the host CLI's, MLflow server's, or set in the image).
NOT_FOR_WORKERS = {
    "DATASET_SPECS_DIR", "AIRFLOW_PORT", "AIRFLOW_API_USERNAME", "AIRFLOW_API_PASSWORD", "SERVING_MLFLOW_USERNAME",
    "SERVING_MLFLOW_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "BUNDLE_TRUSTED_PUBLIC_KEYS",
    "POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY",  # as AIRFLOW__* and in the DB URLs
} | {f.upper() for f in Settings.model_fields if f.startswith("serving_") and f != "serving_admin_api_keys"}


def _referenced(value) -> set[str]:
    return set(VAR_RE.findall(yaml.safe_dump(value)))


def test_no_service_reads_the_whole_env_file():
    for name, svc in _compose()["services"].items():
        assert "env_file" not in svc, f"{name} gets every variable of .env"


def test_each_service_gets_exactly_the_secrets_it_needs():
    services = _compose()["services"]
    assert set(services) == set(EXPECTED_SECRETS)
    for name, svc in services.items():
        got = _referenced(svc) & SECRETS
        assert got == EXPECTED_SECRETS[name], f"{name}: extra {sorted(got - EXPECTED_SECRETS[name])}, " \
                                              f"missing {sorted(EXPECTED_SECRETS[name] - got)}"


def test_serving_gets_only_its_own_variables():
    serving = _compose()["services"]["serving"]
    env = serving["environment"]
    assert set(env) <= SERVING_ENV, sorted(set(env) - SERVING_ENV)
    assert {"SERVING_MLFLOW_USERNAME", "SERVING_MLFLOW_PASSWORD", "BUNDLE_TRUSTED_PUBLIC_KEYS",
            "SERVING_ADMIN_API_KEYS"} <= set(env)
    assert not {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "BUNDLE_SIGNING_KEY"} & _referenced(serving)


def test_seaweedfs_gives_serving_the_scoped_identity_the_local_stack_gives_it():
    """Compose's SeaweedFS config (a printf in its command) and the local stack's (`ops.stack`) hold
    the same two identities: the pipeline's admin and serving's, with contracts' scoped actions."""
    import json

    from contracts.screening import serving_s3_actions
    from ops.stack import _s3_identities

    weed = _compose()["services"]["seaweedfs"]
    script = weed["command"][0]
    template = re.search(r"printf '(.*?)'", script, re.S).group(1)
    values = re.findall(r'"\$\$([A-Z0-9_]+)"', script.split(template, 1)[1].split(">", 1)[0])
    assert {"AWS_SECRET_ACCESS_KEY", "SERVING_S3_ACCESS_KEY_ID", "SERVING_S3_SECRET_ACCESS_KEY", "S3_BUCKET"} <= set(
        weed["environment"])
    env = {"AWS_ACCESS_KEY_ID": "pipeline-id", "AWS_SECRET_ACCESS_KEY": "pipeline-secret",
           "SERVING_S3_ACCESS_KEY_ID": "serving-id", "SERVING_S3_SECRET_ACCESS_KEY": "serving-secret", "S3_BUCKET": "bkt"}
    compose_config = json.loads(template % tuple(env[v] for v in values))
    settings = Settings(aws_access_key_id="pipeline-id", aws_secret_access_key="pipeline-secret",
                        serving_s3_access_key_id="serving-id", serving_s3_secret_access_key="serving-secret",
                        s3_bucket="bkt")
    assert compose_config == _s3_identities(settings)
    serving = compose_config["identities"][1]
    assert serving["actions"] == serving_s3_actions("bkt") and not any(a in ("Admin", "Write", "Read") for a in
                                                                      serving["actions"])


def test_workers_get_every_pipeline_setting():
    env = set(_compose()["services"]["airflow-worker"]["environment"])
    missing = {f.upper() for f in Settings.model_fields} - NOT_FOR_WORKERS - env
    assert not missing, f"settings a worker would silently ignore: {sorted(missing)}"


def test_mlflow_requires_auth_and_is_not_published():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert "ports" not in mlflow, "MLflow must be reachable only inside the compose network"
    assert "--app-name=basic-auth" in mlflow["command"]
    assert not _referenced(mlflow["command"]) & SECRETS, "a secret on the command line shows in ps"
    assert mlflow["volumes"] == ["mlflow-auth:/var/lib/mlflow-auth"]
    users = services["mlflow-users"]
    assert users["entrypoint"] == ["python", "-m", "ops.mlflow_auth"] and users["restart"] == "on-failure"
    for name in ("airflow-worker", "serving"):
        assert services[name]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}


def test_mlflow_auth_config_in_the_image_is_the_one_the_local_stack_writes(tmp_path):
    import configparser

    from ops.mlflow_auth import write_auth_config

    shipped, expected = configparser.ConfigParser(), configparser.ConfigParser()
    shipped.read(PROJECT_ROOT / "scripts/docker/mlflow-basic-auth.ini")
    expected.read(write_auth_config(tmp_path / "a.ini", "sqlite:////var/lib/mlflow-auth/basic_auth.db"))
    assert dict(shipped["mlflow"]) == dict(expected["mlflow"])
    assert "admin_password" not in shipped["mlflow"]  # MLflow reads it from MLFLOW_AUTH_ADMIN_PASSWORD


def _depends(services: dict, name: str) -> set[str]:
    found, todo = set(), [name]
    while todo:
        for dep in services[todo.pop()].get("depends_on", {}):
            if dep not in found:
                found.add(dep)
                todo.append(dep)
    return found


def test_nothing_with_a_secret_starts_before_the_secrets_check():
    services = _compose()["services"]
    check = services["secrets-check"]
    assert check["entrypoint"][-4:] == ["secrets", "check", "--component", "compose"]
    for name in services:
        if name not in ("secrets-check", "redis"):
            assert "secrets-check" in _depends(services, name), name
    for name in ("seaweedfs", "s3-init", "postgres", "airflow-init"):
        assert services[name]["depends_on"]["secrets-check"] == {"condition": "service_completed_successfully"}


def test_s3_init_retries_until_s3_answers_and_s3_health_checks_the_s3_port():
    services = _compose()["services"]
    init, weed = services["s3-init"], services["seaweedfs"]
    assert init["restart"] == "on-failure"
    assert "wait_for_bucket(" in " ".join(init["entrypoint"])
    assert init["depends_on"]["seaweedfs"] == {"condition": "service_healthy"}
    probe = " ".join(weed["healthcheck"]["test"])
    assert "127.0.0.1:8333/" in probe and "9333" not in probe


def _dockerfile(service: dict) -> str:
    build = service.get("build") or {}
    return (PROJECT_ROOT / build.get("context", ".") / build["dockerfile"]).read_text()


def test_named_volume_mount_points_are_created_and_owned_in_the_image():
    """A named volume mounted over a folder the image lacks is created root-owned; the images run as
    uid 50000 (Airflow) / 50001 (MLflow), so each mount point must exist in the image, chowned."""
    compose = _compose()
    named = set(compose["volumes"])
    builds = {svc.get("image"): svc for svc in compose["services"].values() if "build" in svc}
    for name, svc in compose["services"].items():
        mounts = [v.split(":")[1] for v in svc.get("volumes", []) if v.split(":")[0] in named]
        if not mounts or svc.get("image", "").split(":")[0] in ("postgres", "chrislusf/seaweedfs"):
            continue  # upstream images initialise their own data folders
        text = _dockerfile(builds[svc["image"]])
        user = re.search(r"^USER (\S+)", text, flags=re.M).group(1)
        assert user not in ("root", "0"), name
        runs = " ".join(re.findall(r"^RUN ((?:.*\\\n)*.*)", text, flags=re.M))
        for mount in mounts:
            assert re.search(rf"mkdir -p[^&]*\s{re.escape(mount)}(\s|$)", runs), f"{name}: {mount} not created"
            chowned = re.findall(r"chown (?:-R )?\S+ ([^&\n]*)", runs)
            assert any(mount == p or mount.startswith(p.rstrip("/") + "/") for c in chowned for p in c.split()), \
                f"{name}: {mount} not chowned to the image user"


def test_root_dockerignore_sends_only_what_the_images_copy():
    ignore = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "start from nothing, then allow what the images copy"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for secret in (".env", ".hemaflow", ".venv", ".git"):
        assert not any(secret == a or secret.startswith(a + "/") for a in allowed), secret
    for svc in _compose()["services"].values():
        build = svc.get("build")
        if not build or build.get("context") != "." or build["dockerfile"].startswith("serving/"):
            continue  # serving/Dockerfile has its own Dockerfile.dockerignore
        for line in re.findall(r"^COPY (.+)$", _dockerfile(svc), flags=re.M):
            for source in line.split()[:-1]:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"



def test_each_image_copies_the_kernel_and_only_the_packages_it_runs():
    """serving: contracts/ + serving/ (no TensorFlow, no MLflow); Airflow: the DAGs and what their tasks call."""
    copied = {}
    for path in ("serving/Dockerfile", "scripts/docker/airflow.Dockerfile"):
        text = (PROJECT_ROOT / path).read_text()
        copied[path] = {s.rstrip("/").split("/")[0] for line in re.findall(r"^COPY (.+)$", text, flags=re.M)
                        for s in line.split()[:-1]}
    assert copied["serving/Dockerfile"] == {"contracts", "serving"}
    assert copied["scripts/docker/airflow.Dockerfile"] == {"requirements.txt", "contracts", "pipeline", "training",
                                                          "ops", "screening", "dags"}
    pins = {line.split("==")[0].lower() for line in (PROJECT_ROOT / "serving/requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert not pins & {"tensorflow", "tensorflow-cpu", "keras", "mlflow", "boto3"}, pins
