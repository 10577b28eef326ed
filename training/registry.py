"""Model registry and the promotion gate (aliases, never stages).

Gate (as TFX's Evaluator): the candidate must clear absolute floors and beat the current
@champion by GATE_MARGIN on the PRIMARY metric, both evaluated the same way — their
serving bundles (TFLite, with their own stored thresholds) on the candidate's test split.
Primary metric: balanced accuracy for binary tasks (robust to class imbalance, and what a
screening threshold trades off), macro F1 for multiclass (every cell type counts equally).
A tie does not promote (the candidate must be strictly better); with no champion the floors
alone decide. The gate fails closed: a champion that cannot be compared (other labels or
image size) never lets the floors alone promote; the candidate waits as @challenger until
a person promotes it with a reason (`promote_by_person`). Trigger-time overrides can make
floors and margin stricter, never looser (`run_settings`).

Pass: @champion -> candidate, the old champion keeps @previous-champion, and both versions
get tags with reason and time. Fail: @challenger -> candidate, with the reason. Every event
is also appended to the registered model's `history` tag; version tags are never removed.
Alias moves are compare-and-set: a decision is applied only while @champion is still the
version it was made against, and re-applying a promotion that already happened changes
nothing (an Airflow retry).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from contracts.settings import Settings, get_settings
from training.tracking import mlflow_client

log = logging.getLogger("training.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
HISTORY_TAG = "history"
HISTORY_KEEP = 30
TAG_GATE_DECISION = "gate_decision"  # passed | failed | needs_review; absent = not gated yet
NEEDS_REVIEW = "needs_review"
TAG_GATE_OOD = "gate_ood"  # the out-of-scope detector's validation figures the gate saw (JSON)
# Gate settings a run's overrides may raise but never lower.
GATE_THRESHOLDS = ("gate_min_balanced_accuracy", "gate_min_sensitivity", "gate_min_accuracy", "gate_margin")


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, nothing to roll back to...)."""


class ChampionMoved(RegistryError):
    """@champion changed between evaluate and apply: the decision is stale, evaluate again."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    from contracts.bundle import BUNDLE_DIR, read_bundle

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
    from contracts.processed import read_local_meta
    from pipeline.storage import fetch_processed
    from training.data import load_split_arrays

    s = settings or get_settings()
    client = mlflow_client(s)
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
                      "metrics": evaluate_bundle(cand_bundle, images, y),
                      # the out-of-scope detector's validation figures (recorded, not gated on)
                      "ood": (cand_bundle.meta.get("ood") or {}).get("validation")},
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


def run_settings(configured: Settings, overrides: dict[str, Any]) -> Settings:
    """The configured settings with one run's overrides, validated; gate floors and margin only go up.

    Trigger-time params may ask for a stricter gate, never a looser one than configured.
    """
    effective = dict(overrides)
    for key in GATE_THRESHOLDS:
        if key in effective and effective[key] is not None and effective[key] < getattr(configured, key):
            log.warning("override %s=%s ignored: below the configured %s", key, effective[key],
                        getattr(configured, key))
            effective[key] = getattr(configured, key)
    if not effective:
        return configured
    validated = type(configured)(**effective)  # the overrides are checked; the configured values stay as given
    fields = type(configured).model_fields
    return configured.model_copy(update={k: getattr(validated, k) for k in effective if k in fields})


def decide_gate(comparison: dict, settings: Settings | None = None, overrides: dict | None = None) -> dict:
    """Pure decision from `evaluate_against_champion`'s result: {passed, reason, compared_champion, ...}.

    `settings` are the configured ones; `overrides` (a run's params) can only make the gate stricter.
    """
    s = run_settings(settings or get_settings(), overrides or {})
    task = comparison["task"]
    metric = comparison["primary_metric"]
    cand = comparison["candidate"]["metrics"]
    champ = comparison.get("champion")
    floors = {"balanced_accuracy": s.gate_min_balanced_accuracy}
    if task == "binary" and "sensitivity" in cand:
        floors["sensitivity"] = s.gate_min_sensitivity
    else:
        floors["accuracy"] = s.gate_min_accuracy
    failed = [f"{k} {cand.get(k, 0.0):.4f} < floor {v:.4f}" for k, v in floors.items() if cand.get(k, 0.0) < v]
    out = {"primary_metric": metric, "candidate_value": cand.get(metric), "champion_value": None,
           "margin": s.gate_margin, "floors": floors, "champion_version": None, "needs_review": False,
           # What apply_gate checks @champion against (compare-and-set).
           "compared_champion": champ["version"] if champ else None,
           "ood": comparison["candidate"].get("ood")}
    if failed:
        return {**out, "passed": False, "reason": "below floor: " + "; ".join(failed)}
    if champ is None:
        return {**out, "passed": True, "reason": f"no champion yet; floors cleared ({metric} {cand[metric]:.4f})"}
    out["champion_version"] = champ["version"]
    if champ.get("same_as_candidate"):
        return {**out, "passed": False, "reason": f"version {champ['version']} is already the champion"}
    if champ.get("incomparable"):
        candidate = comparison["candidate"]["version"]
        return {**out, "passed": False, "needs_review": True,
                "reason": f"needs a person: champion v{champ['version']} is not comparable ({champ['incomparable']}); "
                          f"floors cleared; to promote: python -m training promote --dataset "
                          f"{comparison.get('dataset', '<dataset>')} --version {candidate} --reason \"...\""}
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


def _check_champion_unchanged(name: str, decision: dict, current) -> None:
    if "compared_champion" not in decision:
        raise RegistryError("the decision does not say which @champion it was made against; run evaluate again")
    expected, now = decision["compared_champion"], (str(current.version) if current is not None else None)
    if expected != now:
        raise ChampionMoved(
            f"{name}@{CHAMPION} is v{now} but the decision was made against v{expected}: "
            "nothing was changed; evaluate the candidate again against the current champion")


def apply_gate(dataset: str, model_version: str, decision: dict, settings: Settings | None = None) -> dict:
    """Move the aliases according to `decision` and record why and when (compare-and-set on @champion)."""
    s = settings or get_settings()
    client = mlflow_client(s)
    name = s.model_name(dataset)
    version = str(model_version)
    current = alias_version(client, name, CHAMPION)
    if decision["passed"] and current is not None and str(current.version) == version:
        return _already_champion(client, name, current)
    _check_champion_unchanged(name, decision, current)
    if decision.get("ood"):
        client.set_model_version_tag(name, version, TAG_GATE_OOD, json.dumps(decision["ood"], sort_keys=True))
    outcome = "passed" if decision["passed"] else NEEDS_REVIEW if decision.get("needs_review") else "failed"
    reason = decision["reason"]
    if not decision["passed"]:
        return _reject(client, name, version, outcome, reason, current)
    now, by = _now(), decision.get("promoted_by")
    for key, value in {TAG_GATE_DECISION: outcome, "gate_reason": reason, "gate_at": now,
                       **({"promoted_by": by} if by else {})}.items():
        client.set_model_version_tag(name, version, key, value)
    return _promote(client, name, version, current, reason, now, by)


def _reject(client, name: str, version: str, outcome: str, reason: str, current) -> dict:
    """The candidate becomes @challenger with the reason; re-applying the same decision changes nothing."""
    tags = client.get_model_version(name, version).tags
    if tags.get(TAG_GATE_DECISION) == outcome and tags.get("gate_reason") == reason:
        return {"event": "rejected", "version": version, "reason": reason, "at": tags.get("gate_at"),
                "outcome": outcome, "champion": current.version if current else None, "already_applied": True}
    now = _now()
    for key, value in {TAG_GATE_DECISION: outcome, "gate_reason": reason, "gate_at": now}.items():
        client.set_model_version_tag(name, version, key, value)
    if current is None or str(current.version) != version:
        client.set_registered_model_alias(name, CHALLENGER, version)
    event = {"event": "rejected", "version": version, "reason": reason, "at": now, "outcome": outcome}
    _record(client, name, event)
    return {**event, "champion": current.version if current else None}


def _promote(client, name: str, version: str, previous, reason: str, now: str, by: str | None) -> dict:
    """Everything about the previous champion is written first; moving @champion is the last step."""
    client.set_model_version_tag(name, version, "promoted_at", now)
    client.set_model_version_tag(name, version, "previous_champion_version", previous.version if previous else "")
    if previous is not None:
        client.set_model_version_tag(name, str(previous.version), "demoted_at", now)
        client.set_model_version_tag(name, str(previous.version), "demoted_by_version", version)
        client.set_model_version_tag(name, str(previous.version), "demoted_reason", reason)
        client.set_registered_model_alias(name, PREVIOUS, str(previous.version))
    client.set_registered_model_alias(name, CHAMPION, version)
    event = {"event": "promoted", "version": version, "previous": previous.version if previous else None,
             "reason": reason, "at": now, **({"by": by} if by else {})}
    _finish_promotion(client, name, version, event)
    return {**event, "champion": version}


def _finish_promotion(client, name: str, version: str, event: dict) -> None:
    """After @champion moved: drop a stale @challenger, record the event once."""
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    try:
        last = json.loads(client.get_registered_model(name).tags.get("last_event", "{}"))
    except ValueError:
        last = {}
    if (last.get("event"), last.get("version")) != ("promoted", version):
        _record(client, name, event)


def _already_champion(client, name: str, current) -> dict:
    """A retried promote: nothing moves; @previous-champion stays the one recorded at promotion."""
    version, tags = str(current.version), current.tags
    previous = tags.get("previous_champion_version") or None
    if previous is not None and previous != version:
        held = alias_version(client, name, PREVIOUS)
        if held is None or str(held.version) != previous:
            client.set_registered_model_alias(name, PREVIOUS, previous)  # the first try stopped before it
    event = {"event": "promoted", "version": version, "previous": previous,
             "reason": tags.get("gate_reason", ""), "at": tags.get("promoted_at") or tags.get("gate_at")}
    _finish_promotion(client, name, version, event)
    return {**event, "champion": version, "already_champion": True}


def promote_if_better(dataset: str, model_version: str, settings: Settings | None = None) -> dict:
    """evaluate_against_champion -> decide_gate -> apply_gate."""
    s = settings or get_settings()
    comparison = evaluate_against_champion(dataset, model_version, s)
    decision = decide_gate(comparison, s)
    applied = apply_gate(dataset, model_version, decision, s)
    return {"comparison": comparison, "decision": decision, "applied": applied}


def promote_by_person(dataset: str, model_version: str, reason: str, by: str,
                      settings: Settings | None = None) -> dict:
    """A person promotes a candidate the gate could not judge (incomparable champion); who and why are recorded.

    The floors and the comparison still run: a candidate the gate rejects is refused here too.
    """
    if not reason or not reason.strip():
        raise RegistryError("a person's promotion needs a reason (--reason \"...\")")
    s = settings or get_settings()
    comparison = evaluate_against_champion(dataset, model_version, s)
    decision = decide_gate(comparison, s)
    if not decision["passed"] and not decision["needs_review"]:
        raise RegistryError(f"the gate rejects version {model_version}: {decision['reason']}; "
                            "a person decides only what the gate cannot (an incomparable champion)")
    decision = {**decision, "passed": True, "promoted_by": by,
                "reason": f"promoted by {by}: {reason.strip()} (gate: {decision['reason']})"}
    applied = apply_gate(dataset, model_version, decision, s)
    return {"comparison": comparison, "decision": decision, "applied": applied}


def rollback(dataset: str, settings: Settings | None = None, reason: str = "manual rollback") -> dict:
    """@champion back to @previous-champion; the demoted version is tagged, nothing is deleted."""
    s = settings or get_settings()
    client = mlflow_client(s)
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
    client = mlflow_client(s)
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
             "gate": v.tags.get(TAG_GATE_DECISION), "reason": v.tags.get("gate_reason"),
             "metrics": {k[7:]: v.tags[k] for k in sorted(v.tags) if k.startswith("metric.")}}
            for v in versions
        ],
        "history": json.loads(model.tags.get(HISTORY_TAG, "[]")),
    }
