"""MLflow runs its basic-auth app: anonymous requests are refused, the pipeline identity writes,
serving's identity only reads, and no secret reaches a log or an MLflow run."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def published(local_stack) -> dict:
    """A run with an artifact and a registered version holding @champion, written by the pipeline user."""
    from mlflow import MlflowClient

    client = MlflowClient(local_stack.mlflow_tracking_uri)
    exp = client.create_experiment(f"auth-{secrets.token_hex(3)}")
    run = client.create_run(exp)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a.txt").write_text("x")
        client.log_artifacts(run.info.run_id, tmp, "serving_bundle")
    client.log_param(run.info.run_id, "p", "1")
    name = f"hemaflow-auth{secrets.token_hex(3)}"
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/serving_bundle", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", mv.version)
    return {"experiment_id": exp, "run_id": run.info.run_id, "name": name, "version": str(mv.version)}


def _api(settings, method: str, path: str, auth=None, **kwargs) -> int:
    return httpx.request(method, settings.mlflow_tracking_uri.rstrip("/") + path, auth=auth, timeout=30,
                         **kwargs).status_code


def test_anonymous_and_wrong_credentials_are_refused(local_stack, published):
    s = local_stack
    alias = {"params": {"name": published["name"], "alias": "champion"}}
    assert _api(s, "GET", "/api/2.0/mlflow/registered-models/alias", **alias) == 401
    assert _api(s, "GET", "/api/2.0/mlflow/registered-models/alias", auth=(s.serving_mlflow_username, "wrong"),
                **alias) == 401
    assert _api(s, "GET", "/health") == 200  # probes stay open


def test_serving_identity_reads_but_cannot_move_the_champion(local_stack, published):
    s = local_stack
    reader = (s.serving_mlflow_username, s.serving_mlflow_password.get_secret_value())
    name, version = published["name"], published["version"]
    assert _api(s, "GET", "/api/2.0/mlflow/registered-models/alias", auth=reader,
                params={"name": name, "alias": "champion"}) == 200
    assert _api(s, "GET", "/api/2.0/mlflow/artifacts/list", auth=reader,
                params={"run_id": published["run_id"], "path": "serving_bundle"}) == 200
    forbidden = [
        ("POST", "/api/2.0/mlflow/registered-models/alias", {"json": {"name": name, "alias": "champion", "version": version}}),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", {"json": {"name": name, "alias": "champion"}}),
        ("POST", "/api/2.0/mlflow/model-versions/create", {"json": {"name": name, "source": "s3://x/y"}}),
        ("POST", "/api/2.0/mlflow/runs/create", {"json": {"experiment_id": published["experiment_id"]}}),
        ("POST", "/api/2.0/mlflow/runs/log-parameter", {"json": {"run_id": published["run_id"], "key": "k", "value": "v"}}),
        ("POST", "/api/2.0/mlflow/users/create", {"json": {"username": "intruder", "password": "x" * 20}}),
    ]
    for method, path, kwargs in forbidden:
        assert _api(s, method, path, auth=reader, **kwargs) == 403, (method, path)


def test_no_secret_in_stack_logs_or_a_training_run(local_stack, tiny_registered_model):
    from mlflow import MlflowClient

    s = local_stack
    values = [s.aws_secret_access_key, s.mlflow_tracking_password, s.serving_mlflow_password,
              s.mlflow_admin_password, s.mlflow_flask_secret_key, s.bundle_signing_key]
    values = [v.get_secret_value() for v in values]
    assert all(values)
    logs = "".join(p.read_text(errors="replace") for p in (s.hemaflow_home / "stack" / "logs").glob("*.log"))
    assert logs  # the services did log something
    run = MlflowClient(s.mlflow_tracking_uri).get_run(tiny_registered_model["run_id"])  # a real training run
    assert run.data.params
    recorded = str((run.data.params, run.data.tags))
    for value in values:
        assert value not in logs and value not in recorded
