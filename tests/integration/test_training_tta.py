"""A real training run (train_candidate on the test stack's SeaweedFS + MLflow) records its served
model's test-time-augmentation figures: the TTA threshold chosen on view-averaged validation
probabilities by the plain threshold's rule, in the signed bundle.json and as MLflow metrics."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, write_processed_version


def test_training_chooses_and_ships_the_tta_threshold(tiny_registered_model):
    from contracts.bundle import TFLiteRunner
    from contracts.tta import BUNDLE_KEY, VIEWS, decision_threshold
    from pipeline.storage import fetch_processed, load_meta
    from training.data import load_split_arrays
    from training.evaluate import choose_threshold
    from training.gate import download_bundle
    from training.tracking import mlflow_client
    from training.tta import averaged_probabilities

    info, s = tiny_registered_model, tiny_registered_model["settings"]
    client = mlflow_client(s)
    bundle = download_bundle(client, info["run_id"], s)
    record = bundle.meta[BUNDLE_KEY]
    assert record["views"] == VIEWS and set(record["validation"]) >= {"balanced_accuracy", "sensitivity"}
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["tta_threshold"] == record["threshold"] == decision_threshold(bundle.meta, tta=True)
    assert metrics["tta_test_balanced_accuracy"] == record["test"]["balanced_accuracy"]
    # Re-derived from the shipped model and the run's validation split: the same rule, the same value.
    meta = load_meta(info["dataset"], info["dataset_version"], s)
    folder = fetch_processed(info["dataset"], info["dataset_version"], s)
    val_x, val_y = load_split_arrays(folder, meta, "val")
    probs = averaged_probabilities(TFLiteRunner(bundle.files["model.tflite"]), val_x)
    pos = bundle.meta["labels"].index(bundle.meta["positive_label"])
    assert np.isclose(record["threshold"], choose_threshold(val_y == pos, probs[:, pos], s.target_sensitivity))


def test_gate_evaluates_bundles_as_they_answer_with_tta(tiny_registered_model):
    """INFERENCE_TTA on: the gate scores candidate and champion on view-averaged probabilities with
    their TTA thresholds (as serving and screening answer), and says so in the comparison."""
    from training.gate import decide_gate, download_bundle, evaluate_against_champion
    from training.tracking import mlflow_client

    info = tiny_registered_model
    plain = evaluate_against_champion(info["dataset"], info["model_version"], info["settings"])
    s = info["settings"].model_copy(update={"inference_tta": True})
    with_tta = evaluate_against_champion(info["dataset"], info["model_version"], s)
    assert plain["tta"] is False and with_tta["tta"] is True
    meta = download_bundle(mlflow_client(s), info["run_id"], s).meta
    assert plain["candidate"]["metrics"]["threshold"] == meta["threshold"]
    assert with_tta["candidate"]["metrics"]["threshold"] == meta["tta"]["threshold"]
    assert with_tta["candidate"]["metrics"]["balanced_accuracy"] == meta["tta"]["test"]["balanced_accuracy"]
    assert decide_gate(with_tta, s)["tta"] is True


@pytest.mark.parametrize("rule, card_says", [
    ("conformal", "0.900 by the split-conformal rule: an unseen abnormal image falls below it with probability at "
                  "most 0.100"),
    ("quantile", "0.900 on unseen images on average (the validation abnormal images' 0.100 quantile)")])
def test_a_run_with_a_rank_rule_ships_its_threshold_and_says_so(tiny_registered_model, rule, card_says):
    """THRESHOLD_RULE=conformal or quantile through a real run: the shipped TTA threshold is that rule's
    on the served model's view-averaged validation scores (of 12 positives at 0.9: conformal the lowest,
    quantile between the lowest and the 2nd lowest, which the validation rule takes; a tiny model's
    scores may all be 1.0, so unit tests check the rules' arithmetic), and the MLflow params, the
    bundle (read by serving's /v1/model) and the model card name the rule."""
    from contracts.bundle import MODEL_CARD_FILE, THRESHOLD_RULE_KEY, TFLiteRunner
    from contracts.tta import BUNDLE_KEY
    from pipeline.storage import fetch_processed, load_meta
    from training.data import load_split_arrays
    from training.evaluate import choose_threshold
    from training.gate import download_bundle
    from training.tracking import mlflow_client
    from training.train import train_candidate
    from training.tta import averaged_probabilities

    s = tiny_registered_model["settings"]
    dataset = f"tiny{rule[:4]}{secrets.token_hex(3)}"
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal")
    trained = train_candidate(dataset, version, s, epochs=2, threshold_rule=rule, target_sensitivity=0.9)
    client = mlflow_client(s)
    params = client.get_run(trained["run_id"]).data.params
    assert (params["threshold_rule"], params["target_sensitivity"]) == (rule, "0.9")
    bundle = download_bundle(client, trained["run_id"], s)
    assert bundle.meta[THRESHOLD_RULE_KEY] == {"rule": rule, "target_sensitivity": 0.9}
    meta = load_meta(dataset, version, s)
    val_x, val_y = load_split_arrays(fetch_processed(dataset, version, s), meta, "val")
    probs = averaged_probabilities(TFLiteRunner(bundle.files["model.tflite"]), val_x)
    pos = bundle.meta["labels"].index("abnormal")
    positives = np.sort(probs[val_y == pos, pos])
    assert positives.size == 12
    shipped = bundle.meta[BUNDLE_KEY]["threshold"]
    assert np.isclose(shipped, choose_threshold(val_y == pos, probs[:, pos], 0.9, rule))
    assert np.isclose(choose_threshold(val_y == pos, probs[:, pos], 0.9), positives[1])
    if rule == "conformal":
        assert np.isclose(shipped, positives[0])
    else:
        assert positives[0] - 1e-9 <= shipped <= positives[1] + 1e-9
    assert card_says in bundle.files[MODEL_CARD_FILE].decode()


def test_a_spec_that_chooses_one_view_ships_that_default(tiny_registered_model, tmp_path):
    """A dataset spec with `inference_tta = false`: its run records the choice (bundle.json
    tta.on_by_default, MLflow param); with INFERENCE_TTA unset the gate and batch screening use one
    view and the plain threshold, a value set for INFERENCE_TTA still wins. A dataset with no spec
    (the tiny registered model's) keeps TTA on by default."""
    from contracts.bundle import MODEL_CARD_FILE
    from contracts.tta import DEFAULT_KEY, DEFAULT_PARAM
    from screening.champion import ChampionRef, champion_uses_tta
    from training.gate import download_bundle, evaluate_against_champion
    from training.tracking import mlflow_client
    from training.train import train_candidate

    dataset = f"tinyone{secrets.token_hex(3)}"
    specs = tmp_path / "specs"
    specs.mkdir()
    classes = "\n".join(f'{folder} = "{label}"' for folder, label in TINY_CLASSES.items())
    (specs / f"{dataset}.toml").write_text(f'name = "{dataset}"\npositive_label = "abnormal"\n'
                                           f"inference_tta = false\n\n[classes]\n{classes}\n")
    s = tiny_registered_model["settings"].model_copy(update={"dataset_specs_dir": specs, "inference_tta": None})
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal")
    trained = train_candidate(dataset, version, s, epochs=2)
    client = mlflow_client(s)
    assert client.get_run(trained["run_id"]).data.params[DEFAULT_PARAM] == "False"
    bundle = download_bundle(client, trained["run_id"], s)
    meta = bundle.meta
    assert meta["tta"][DEFAULT_KEY] is False and meta["tta"]["threshold"] is not None
    assert "spec has it answer from one view by default" in bundle.files[MODEL_CARD_FILE].decode()
    forced = s.model_copy(update={"inference_tta": True})
    unset_gate = evaluate_against_champion(dataset, trained["model_version"], s)
    forced_gate = evaluate_against_champion(dataset, trained["model_version"], forced)
    assert unset_gate["tta"] is False and unset_gate["candidate"]["metrics"]["threshold"] == meta["threshold"]
    assert forced_gate["tta"] is True and forced_gate["candidate"]["metrics"]["threshold"] == meta["tta"]["threshold"]
    ref = ChampionRef(s.model_name(dataset), str(trained["model_version"]), trained["run_id"])
    assert champion_uses_tta(ref, s) is False and champion_uses_tta(ref, forced) is True
    no_spec = tiny_registered_model
    on = download_bundle(client, no_spec["run_id"], s)
    assert on.meta["tta"][DEFAULT_KEY] is True
    assert "spec has it answer this way by default, unless INFERENCE_TTA" in on.files[MODEL_CARD_FILE].decode()
    assert champion_uses_tta(ChampionRef(no_spec["model_name"], str(no_spec["model_version"]), no_spec["run_id"]),
                             s) is True
