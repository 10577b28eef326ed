"""Training, registry and promotion gate against the real local MLflow + SeaweedFS."""

from __future__ import annotations

import secrets

import pytest

from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, TINY_TRAIN, write_processed_version

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def test_tiny_training_registers_a_version_with_bundle_and_provenance(tiny_registered_model):
    from contracts.bundle import check_canaries
    from training.gate import download_bundle

    info = tiny_registered_model
    s = info["settings"]
    client = _client(s)
    version = client.get_model_version(info["model_name"], info["model_version"])
    assert version.run_id == info["run_id"]
    assert version.tags["dataset_version"] == info["dataset_version"]
    assert len(version.tags["git_commit"]) >= 7 and version.tags["config_hash"]
    assert client.get_model_version_by_alias(info["model_name"], "champion").version == info["model_version"]
    run = client.get_run(info["run_id"])
    # The version's metric tag is the run's test metric (what `training status` and the gate show).
    assert abs(float(version.tags["metric.balanced_accuracy"]) - run.data.metrics["test_balanced_accuracy"]) < 1e-5
    assert run.data.params["dataset_version"] == info["dataset_version"]
    assert run.data.params["image_size"] == "32" and "pkg_tensorflow-cpu" in run.data.params
    assert len(run.data.params["manifest_sha256"]) == 64
    assert "test_balanced_accuracy" in run.data.metrics and "test_ece" in run.data.metrics
    assert len(client.get_metric_history(info["run_id"], "val_loss")) >= 1
    artifacts = {f.path for f in client.list_artifacts(info["run_id"], "serving_bundle")}
    assert {"serving_bundle/model.tflite", "serving_bundle/bundle.json", "serving_bundle/SHA256SUMS"} <= artifacts
    plots = {f.path for f in client.list_artifacts(info["run_id"], "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/calibration.png", "plots/training_curves.png"} <= plots
    report = client.download_artifacts(info["run_id"], "reports/classification_report.txt")
    assert "abnormal" in open(report).read()
    bundle = download_bundle(client, info["run_id"], s)
    assert bundle.meta["run_id"] == info["run_id"] and bundle.meta["task"] == "binary"
    assert 0.0 <= bundle.meta["threshold"] <= 1.0
    assert check_canaries(bundle) <= 1e-4  # same machine, same kernels: even a quantized model repeats itself
    # MODEL_QUANTIZATION's default is asked for; the bundle and the run say what was shipped and why.
    quantization = bundle.meta["quantization"]
    assert run.data.params["model_quantization"] == "dynamic_int8"
    assert run.data.tags["quantization"] == quantization["method"]
    assert quantization["validation"]["images"] >= 1
    assert run.data.metrics["quantization_decision_agreement"] == quantization["validation"]["decision_agreement"]
    if quantization["method"] == "none":
        assert run.data.tags["quantization_fallback"] == quantization["fallback_reason"]
    # Reproducible end: the run says what ended it; the temperature fitted on validation is in the bundle.
    assert run.data.tags["stop_reason"] in ("epochs", "early_stopping", "time_budget")
    assert run.data.params["stop_reason"] == run.data.tags["stop_reason"] == bundle.meta["stop_reason"]
    calibration = bundle.meta["calibration"]
    assert calibration["method"] == "temperature" and calibration["fitted_on"] == "validation"
    assert calibration["temperature"] > 0 and "calibration_val_ece_after" in run.data.metrics
    assert bundle.meta["preprocessing"]["crop"] == "center_crop"


def test_unchanged_rerun_trains_nothing(tiny_registered_model):
    from training.train import train_candidate

    info = tiny_registered_model
    client = _client(info["settings"])
    before = len(client.search_model_versions(f"name='{info['model_name']}'"))
    again = train_candidate(info["dataset"], info["dataset_version"], info["settings"])
    assert again["skipped"] is True and again["model_version"] == info["model_version"]
    assert len(client.search_model_versions(f"name='{info['model_name']}'")) == before


def test_gate_promotes_better_rejects_worse_and_rollback_restores(local_stack):
    from training.gate import promote_if_better
    from training.registry import rollback, status

    from training.train import train_candidate

    s = local_stack.model_copy(update=TINY_TRAIN)
    dataset = f"tinygate{secrets.token_hex(3)}"
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=3)
    name = s.model_name(dataset)
    client = _client(s)
    # A deterministic bad model: trained on a version whose labels are swapped, evaluated on
    # the true test split it is confidently wrong.
    swapped = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=3,
                                      swap_labels=True)
    no_floors = s.model_copy(update={"gate_min_balanced_accuracy": 0.0, "gate_min_sensitivity": 0.0})

    weak = train_candidate(dataset, swapped, s)
    first = promote_if_better(dataset, weak["model_version"], no_floors)
    assert first["decision"]["passed"] and first["comparison"]["champion"] is None
    assert "no champion" in first["decision"]["reason"]
    assert first["comparison"]["reviewed"] == first["decision"]["reviewed"] == {"n": 0}  # none in this version
    assert client.get_run(weak["run_id"]).data.metrics["reviewed_n"] == 0

    good = train_candidate(dataset, version, s)
    gate = promote_if_better(dataset, good["model_version"], s)
    assert gate["comparison"]["champion"]["version"] == weak["model_version"]
    assert gate["decision"]["passed"], gate["decision"]
    assert gate["decision"]["candidate_value"] > gate["decision"]["champion_value"]
    assert client.get_model_version_by_alias(name, "champion").version == good["model_version"]
    assert client.get_model_version_by_alias(name, "previous-champion").version == weak["model_version"]
    demoted = client.get_model_version(name, weak["model_version"])
    assert demoted.tags["demoted_by_version"] == good["model_version"] and demoted.tags["demoted_at"]

    worse = train_candidate(dataset, swapped, s, seed=99)
    gate = promote_if_better(dataset, worse["model_version"], no_floors)
    assert gate["comparison"]["evaluated_on"] == swapped  # the candidate's own test split
    assert gate["decision"]["passed"] is False, gate["decision"]
    assert "does not beat champion" in gate["decision"]["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == good["model_version"]
    assert client.get_model_version_by_alias(name, "challenger").version == worse["model_version"]
    rejected = client.get_model_version(name, worse["model_version"])
    assert rejected.tags["gate_decision"] == "failed" and "does not beat" in rejected.tags["gate_reason"]

    back = rollback(dataset, s, reason="test rollback")
    assert back["champion"] == weak["model_version"] and back["from"] == good["model_version"]
    assert client.get_model_version_by_alias(name, "champion").version == weak["model_version"]
    restored_from = client.get_model_version(name, good["model_version"])
    assert restored_from.tags["rolled_back_reason"] == "test rollback"
    info = status(dataset, s)
    assert [e["event"] for e in info["history"]] == ["promoted", "promoted", "rejected", "rollback"]
    assert len(info["versions"]) == 3  # history is never lost
    from training.registry import RegistryError

    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(dataset, s)


def test_floors_reject_a_candidate_when_there_is_no_champion(local_stack):
    from training.gate import promote_if_better
    from training.train import train_candidate

    s = local_stack.model_copy(update={**TINY_TRAIN, "gate_min_balanced_accuracy": 1.01})
    dataset = f"tinyfloor{secrets.token_hex(3)}"
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=4)
    trained = train_candidate(dataset, version, s, epochs=1)
    gate = promote_if_better(dataset, trained["model_version"], s)
    assert gate["decision"]["passed"] is False and "below floor" in gate["decision"]["reason"]
    client = _client(s)
    assert client.get_model_version_by_alias(s.model_name(dataset), "challenger").version == trained["model_version"]


def test_nan_loss_fails_the_run_and_registers_nothing(local_stack):
    from training.errors import TrainingError
    from training.train import train_candidate

    s = local_stack.model_copy(update=TINY_TRAIN)
    dataset = f"tinynan{secrets.token_hex(3)}"
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=5)
    with pytest.raises(TrainingError, match="NaN"):
        train_candidate(dataset, version, s, learning_rate=1e12, epochs=2)
    client = _client(s)
    assert client.search_model_versions(f"name='{s.model_name(dataset)}'") == []
    exp = client.get_experiment_by_name(s.model_name(dataset))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_mlflow_unreachable_gives_a_clear_error(local_stack):
    from training.errors import MlflowUnavailable
    from training.train import train_candidate

    from ops.supervisor import free_port

    s = local_stack.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(MlflowUnavailable, match="unreachable.*stack up"):
        train_candidate("leukemia", "any-version", s)


def test_cli_status_and_clear_error_on_rollback_without_previous(tiny_registered_model):
    import subprocess
    import sys

    from contracts.settings import PROJECT_ROOT

    info = tiny_registered_model
    cmd = [sys.executable, "-m", "training"]
    out = subprocess.run(cmd + ["status", "--dataset", info["dataset"]], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"@champion=v{info['model_version']}" in out.stdout
    assert info["dataset_version"] in out.stdout
    out = subprocess.run(cmd + ["rollback", "--dataset", info["dataset"]], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert "nothing to roll back to" in out.stderr and "Traceback" not in out.stderr
