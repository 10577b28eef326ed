"""Model registry and the promotion gate (aliases, never stages).

Gate (as TFX's Evaluator): the candidate must clear absolute floors and beat the current
@champion by GATE_MARGIN on the PRIMARY metric, both evaluated the same way — their
serving bundles (TFLite, with their own stored thresholds) on the candidate's test split.
Primary metric: balanced accuracy for binary tasks (robust to class imbalance, and what a
screening threshold trades off), macro F1 for multiclass (every cell type counts equally).
A tie does not promote (the candidate must be strictly better); with no champion, or a
champion that cannot be compared (other labels or image size), the floors alone decide.

Pass: @champion -> candidate, the old champion keeps @previous-champion, and both versions
get tags with reason and time. Fail: @challenger -> candidate, with the reason. Every event
is also appended to the registered model's `history` tag; version tags are never removed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.settings import Settings, get_settings

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
HISTORY_TAG = "history"
HISTORY_KEEP = 30


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, nothing to roll back to...)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _client(s: Settings):
    from training.train import mlflow_client

    return mlflow_client(s)


def alias_version(client, model_name: str, alias: str):
    """The ModelVersion behind `alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def primary_metric(task: str) -> str:
    return "balanced_accuracy" if task == "binary" else "macro_f1"


# --- evaluation through the serving bundles --------------------------------------------------


def download_bundle(client, run_id: str, s: Settings):
    """Download and verify a run's serving bundle (cached per run id)."""
    from serving.bundle import BUNDLE_DIR
    from training.bundle import read_bundle

    target = s.hemaflow_home / "cache" / "bundles" / run_id
    if (target / "SHA256SUMS").is_file():
        return read_bundle(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=target.parent))
    try:
        local = client.download_artifacts(run_id, BUNDLE_DIR, str(tmp))
        read_bundle(local)  # verify the checksums before caching
        if target.exists():
            shutil.rmtree(target)
        Path(local).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_bundle(target)


def evaluate_bundle(bundle, images, y) -> dict[str, Any]:
    from training.evaluate import compute_metrics

    probs = bundle.runner().predict_proba(images.astype("float32"))
    meta = bundle.meta
    return compute_metrics(y, probs, meta["labels"], meta.get("positive_label"), meta.get("threshold"))


def evaluate_against_champion(dataset: str, model_version: str, settings: Settings | None = None) -> dict:
    """Candidate and @champion, both evaluated via their bundles on the candidate's test split."""
    from pipeline.processed import fetch_processed, read_local_meta
    from training.data import load_split_arrays

    s = settings or get_settings()
    client = _client(s)
    name = s.model_name(dataset)
    candidate = client.get_model_version(name, str(model_version))
    ds_version = candidate.tags.get("dataset_version")
    if not ds_version:
        raise RegistryError(f"{name} version {model_version} has no dataset_version tag")
    folder = fetch_processed(dataset, ds_version, s)
    meta = read_local_meta(folder)
    images, y = load_split_arrays(folder, meta, "test")
    cand_bundle = download_bundle(client, candidate.run_id, s)
    task = cand_bundle.meta["task"]
    result: dict[str, Any] = {
        "dataset": dataset,
        "model_name": name,
        "evaluated_on": ds_version,
        "test_images": int(len(y)),
        "task": task,
        "primary_metric": primary_metric(task),
        "candidate": {"version": str(candidate.version), "run_id": candidate.run_id,
                      "metrics": evaluate_bundle(cand_bundle, images, y)},
        "champion": None,
    }
    champ = alias_version(client, name, CHAMPION)
    if champ is None:
        return result
    entry: dict[str, Any] = {"version": str(champ.version), "run_id": champ.run_id,
                             "dataset_version": champ.tags.get("dataset_version"), "metrics": None}
    if str(champ.version) == str(candidate.version):
        entry["metrics"] = result["candidate"]["metrics"]
        entry["same_as_candidate"] = True
    else:
        champ_bundle = download_bundle(client, champ.run_id, s)
        if champ_bundle.meta["labels"] != cand_bundle.meta["labels"]:
            entry["incomparable"] = f"labels differ ({champ_bundle.meta['labels']} vs {cand_bundle.meta['labels']})"
        elif int(champ_bundle.meta["image_size"]) != meta.image_size:
            entry["incomparable"] = f"image size differs ({champ_bundle.meta['image_size']} vs {meta.image_size})"
        else:
            entry["metrics"] = evaluate_bundle(champ_bundle, images, y)
    result["champion"] = entry
    return result


# --- the gate --------------------------------------------------------------------------------


def decide_gate(comparison: dict, settings: Settings | None = None) -> dict:
    """Pure decision from `evaluate_against_champion`'s result: {passed, reason, ...}."""
    s = settings or get_settings()
    task = comparison["task"]
    metric = comparison["primary_metric"]
    cand = comparison["candidate"]["metrics"]
    floors = {"balanced_accuracy": s.gate_min_balanced_accuracy}
    if task == "binary" and "sensitivity" in cand:
        floors["sensitivity"] = s.gate_min_sensitivity
    else:
        floors["accuracy"] = s.gate_min_accuracy
    failed = [f"{k} {cand.get(k, 0.0):.4f} < floor {v:.4f}" for k, v in floors.items() if cand.get(k, 0.0) < v]
    out = {"primary_metric": metric, "candidate_value": cand.get(metric), "champion_value": None,
           "margin": s.gate_margin, "floors": floors, "champion_version": None}
    if failed:
        return {**out, "passed": False, "reason": "below floor: " + "; ".join(failed)}
    champ = comparison.get("champion")
    if champ is None:
        return {**out, "passed": True, "reason": f"no champion yet; floors cleared ({metric} {cand[metric]:.4f})"}
    out["champion_version"] = champ["version"]
    if champ.get("same_as_candidate"):
        return {**out, "passed": False, "reason": f"version {champ['version']} is already the champion"}
    if champ.get("incomparable"):
        return {**out, "passed": True,
                "reason": f"champion v{champ['version']} not comparable ({champ['incomparable']}); floors cleared"}
    cv, hv = float(cand[metric]), float(champ["metrics"][metric])
    out["champion_value"] = hv
    if cv > hv + s.gate_margin:
        return {**out, "passed": True,
                "reason": f"{metric} {cv:.4f} beats champion v{champ['version']} {hv:.4f} by > {s.gate_margin:.4f}"}
    return {**out, "passed": False,
            "reason": f"{metric} {cv:.4f} does not beat champion v{champ['version']} {hv:.4f} by > {s.gate_margin:.4f}"}


def _record(client, name: str, event: dict) -> None:
    """Append an event to the registered model's bounded `history` tag (version tags keep all)."""
    model = client.get_registered_model(name)
    try:
        history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        history = []
    history = (history + [event])[-HISTORY_KEEP:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history, separators=(",", ":")))
    client.set_registered_model_tag(name, "last_event", json.dumps(event, separators=(",", ":")))


def apply_gate(dataset: str, model_version: str, decision: dict, settings: Settings | None = None) -> dict:
    """Move the aliases according to `decision` and record why and when."""
    s = settings or get_settings()
    client = _client(s)
    name = s.model_name(dataset)
    version = str(model_version)
    now = _now()
    reason = decision["reason"]
    for key, value in {"gate_decision": "passed" if decision["passed"] else "failed",
                       "gate_reason": reason, "gate_at": now}.items():
        client.set_model_version_tag(name, version, key, value)
    if not decision["passed"]:
        champ = alias_version(client, name, CHAMPION)
        if champ is None or str(champ.version) != version:
            client.set_registered_model_alias(name, CHALLENGER, version)
        event = {"event": "rejected", "version": version, "reason": reason, "at": now}
        _record(client, name, event)
        return {**event, "champion": champ.version if champ else None}
    previous = alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_at", now)
    client.set_model_version_tag(name, version, "previous_champion_version", previous.version if previous else "")
    if previous is not None and str(previous.version) != version:
        client.set_registered_model_alias(name, PREVIOUS, str(previous.version))
        client.set_model_version_tag(name, str(previous.version), "demoted_at", now)
        client.set_model_version_tag(name, str(previous.version), "demoted_by_version", version)
        client.set_model_version_tag(name, str(previous.version), "demoted_reason", reason)
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    event = {"event": "promoted", "version": version, "previous": previous.version if previous else None,
             "reason": reason, "at": now}
    _record(client, name, event)
    return {**event, "champion": version}


def promote_if_better(dataset: str, model_version: str, settings: Settings | None = None) -> dict:
    """evaluate_against_champion -> decide_gate -> apply_gate."""
    s = settings or get_settings()
    comparison = evaluate_against_champion(dataset, model_version, s)
    decision = decide_gate(comparison, s)
    applied = apply_gate(dataset, model_version, decision, s)
    return {"comparison": comparison, "decision": decision, "applied": applied}


def rollback(dataset: str, settings: Settings | None = None, reason: str = "manual rollback") -> dict:
    """@champion back to @previous-champion; the demoted version is tagged, nothing is deleted."""
    s = settings or get_settings()
    client = _client(s)
    name = s.model_name(dataset)
    current = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if current is None:
        raise RegistryError(f"{name} has no @{CHAMPION}; nothing to roll back")
    if previous is None:
        raise RegistryError(f"{name} has no @{PREVIOUS}; nothing to roll back to")
    now = _now()
    client.set_registered_model_alias(name, CHAMPION, str(previous.version))
    client.set_model_version_tag(name, str(current.version), "rolled_back_at", now)
    client.set_model_version_tag(name, str(current.version), "rolled_back_reason", reason)
    client.set_model_version_tag(name, str(previous.version), "restored_at", now)
    # The restored champion's own predecessor (if any) becomes the next rollback target.
    older = previous.tags.get("previous_champion_version", "")
    if older and older != str(previous.version):
        client.set_registered_model_alias(name, PREVIOUS, older)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    event = {"event": "rollback", "version": str(previous.version), "from": str(current.version),
             "reason": reason, "at": now}
    _record(client, name, event)
    return {**event, "champion": str(previous.version), "previous_champion": older or None}


def status(dataset: str, settings: Settings | None = None) -> dict:
    """Aliases and every version with its key tags (for the CLI and the DAG logs)."""
    s = settings or get_settings()
    client = _client(s)
    name = s.model_name(dataset)
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {"model_name": name, "exists": False, "aliases": {}, "versions": [], "history": []}
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {
        "model_name": name,
        "exists": True,
        "aliases": {alias: str(v) for alias, v in (model.aliases or {}).items()},
        "versions": [
            {"version": str(v.version), "run_id": v.run_id, "dataset_version": v.tags.get("dataset_version"),
             "gate": v.tags.get("gate_decision"), "reason": v.tags.get("gate_reason"),
             "metrics": {k[7:]: v.tags[k] for k in sorted(v.tags) if k.startswith("metric.")}}
            for v in versions
        ],
        "history": json.loads(model.tags.get(HISTORY_TAG, "[]")),
    }
