"""The gate's figures on reviewed images, on real SeaweedFS + MLflow: raw images named like
screening feedback's copies (`reviewed-<batch>-<sha16>.png`) go through ingest -> validate ->
preprocess, land in any split, and the gate scores candidate and champion on exactly them."""

from __future__ import annotations

import hashlib

import pytest

from tests.fixtures.training import TINY_TRAIN

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REVIEWED_PER_CLASS = 3
NO_FLOORS = {"gate_min_balanced_accuracy": 0.0, "gate_min_sensitivity": 0.0, "gate_min_accuracy": 0.0}


def _rename_some_as_reviewed(root, per_class: int) -> set[str]:
    """Rename the first `per_class` images of each class folder the way feedback names its copies."""
    names = set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir())[:per_class]:
            sha16 = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            target = path.with_name(f"reviewed-b1-{sha16}{path.suffix}")
            path.rename(target)
            names.add(f"{folder.name}/{target.name}")
    return names


def test_gate_reports_candidate_and_champion_on_reviewed_images(tiny_dataset_factory, capsys, monkeypatch):
    from mlflow import MlflowClient

    from contracts.processed import read_local_manifest
    from contracts.screening import is_reviewed_key
    from contracts.stages import RunResults
    from ops.report import build_summary, summary_markdown
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess
    from pipeline.storage import fetch_processed
    from pipeline.upload import upload_tree
    from pipeline.validate import validate
    from training.gate import promote_if_better
    from training.train import train_candidate

    settings, dataset, root = tiny_dataset_factory({"neg": 16, "pos": 16}, **TINY_TRAIN)
    s = settings.model_copy(update=NO_FLOORS)
    reviewed_names = _rename_some_as_reviewed(root, REVIEWED_PER_CLASS)
    n_reviewed = len(reviewed_names)
    upload_tree(root, dataset, s, emit_asset_event=False)
    ingested = ingest(dataset, s)
    assert ingested.reviewed == n_reviewed
    version = preprocess(validate(ingested.manifest_key, dataset, s).validated_key, dataset, s).dataset_version
    rows = [r for r in read_local_manifest(fetch_processed(dataset, version, s)) if is_reviewed_key(r["key"])]
    assert sorted(r["key"].split("/", 2)[2] for r in rows) == sorted(reviewed_names)
    assert {r["split"] for r in rows} - {"test"}, "some reviewed images must land outside the test split"

    first = train_candidate(dataset, version, s, epochs=2)
    gate = promote_if_better(dataset, first["model_version"], s)
    reviewed = gate["comparison"]["reviewed"]
    assert reviewed["n"] == n_reviewed and reviewed["champion"] is None  # no champion yet
    assert reviewed["candidate"]["n"] == n_reviewed
    assert sum(map(sum, reviewed["candidate"]["confusion_matrix"])) == n_reviewed
    assert gate["decision"]["reviewed"] == reviewed and gate["decision"]["passed"]

    second = train_candidate(dataset, version, s, epochs=2, seed=11)
    gate = promote_if_better(dataset, second["model_version"], s)
    reviewed = gate["comparison"]["reviewed"]
    assert gate["comparison"]["champion"]["version"] == first["model_version"]
    assert reviewed["n"] == n_reviewed
    assert reviewed["candidate"]["n"] == reviewed["champion"]["n"] == n_reviewed
    assert gate["decision"]["reviewed"] == reviewed

    run = MlflowClient(tracking_uri=s.mlflow_tracking_uri).get_run(second["run_id"])
    assert run.data.metrics["reviewed_n"] == n_reviewed
    assert run.data.metrics["reviewed_accuracy"] == pytest.approx(reviewed["candidate"]["accuracy"])
    assert run.data.metrics["reviewed_champion_balanced_accuracy"] == pytest.approx(
        reviewed["champion"]["balanced_accuracy"])

    summary = build_summary(dataset, RunResults.from_dict({"train": second, "gate": gate["decision"]}))
    assert f"Reviewed images at the gate ({n_reviewed}, not gated on): candidate accuracy" in summary_markdown(summary)

    # `python -m training evaluate` prints the same figures on reviewed images (nothing changes)
    from training.__main__ import main as training_main

    monkeypatch.setenv("DATASET_SPECS_DIR", str(s.dataset_specs_dir))
    capsys.readouterr()
    assert training_main(["evaluate", "--dataset", dataset, "--version", str(second["model_version"])]) == 0
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if ln.startswith("Reviewed images at the gate")), None)
    assert line is not None, out
    assert line.startswith(f"Reviewed images at the gate ({n_reviewed}, not gated on): "
                           f"candidate accuracy {reviewed['candidate']['accuracy']:.4f}, "
                           f"balanced_accuracy {reviewed['candidate']['balanced_accuracy']:.4f}; champion accuracy "), line
