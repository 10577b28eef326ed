"""The promotion gate: evaluate the candidate and @champion the same way, then decide.

Gate (as TFX's Evaluator): the candidate must clear absolute floors and beat the current
@champion by GATE_MARGIN on the PRIMARY metric, both evaluated the same way — their
serving bundles (TFLite, with their own stored thresholds; with INFERENCE_TTA, averaged over the
8 views with their TTA thresholds, as serving and screening answer) on the candidate's test split.
Primary metric: balanced accuracy for binary tasks (robust to class imbalance, and what a
screening threshold trades off), macro F1 for multiclass (every cell type counts equally).
A tie does not promote (the candidate must be strictly better); with no champion the floors
alone decide. The gate fails closed: a champion that cannot be compared (other labels or
image size) never lets the floors alone promote; the candidate waits as @challenger until
a person promotes it with a reason (`promote_by_person`). Trigger-time overrides can make
floors and margin stricter, never looser (`run_settings`). Applying a decision to the
registry's aliases is `training.registry.apply_gate`.

Reviewed images (joined by screening feedback, `contracts.screening.is_reviewed_key`) are also
scored by both bundles wherever they landed (any split): `reviewed: {n, candidate, champion}` is
recorded in the comparison, the decision, the candidate run's `reviewed_*` metrics and the run
report, and is not gated on (a handful of images, chosen because a model was unsure).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from contracts.bundle import BUNDLE_DIR, read_bundle
from contracts.processed import read_local_manifest, read_local_meta
from contracts.screening import is_reviewed_key
from contracts.settings import Settings, get_settings
from pipeline.storage import fetch_processed
from training.data import load_examples_by_sha256, load_split_arrays
from training.evaluate import compute_metrics, scalar_metrics
from training.registry import CHAMPION, RegistryError, alias_version, apply_gate
from training.tracking import mlflow_client

log = logging.getLogger("training.gate")

GATE_THRESHOLDS = ("gate_min_balanced_accuracy", "gate_min_sensitivity", "gate_min_accuracy", "gate_margin")


def primary_metric(task: str) -> str:
    return "balanced_accuracy" if task == "binary" else "macro_f1"


def cached_bundle(run_id: str, s: Settings):
    """The run's bundle from the local cache (checksums verified), or None: no MLflow import."""
    target = s.hemaflow_home / "cache" / "bundles" / run_id
    return read_bundle(target) if (target / "SHA256SUMS").is_file() else None


def download_bundle(client, run_id: str, s: Settings):
    """Download and verify a run's serving bundle (cached per run id)."""
    target = s.hemaflow_home / "cache" / "bundles" / run_id
    cached = cached_bundle(run_id, s)
    if cached is not None:
        return cached
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


def evaluate_bundle(bundle, images, y, tta: bool = False) -> dict[str, Any]:
    """The bundle's figures as it answers when served: with `tta` (INFERENCE_TTA) the view-averaged
    probabilities and the bundle's TTA threshold (`contracts.tta.decision_threshold`)."""
    from contracts.tta import decision_threshold
    from training.tta import served_probabilities

    probs = served_probabilities(bundle.runner(), images, tta)
    meta = bundle.meta
    return compute_metrics(y, probs, meta["labels"], meta.get("positive_label"), decision_threshold(meta, tta))


def reviewed_examples(folder: Path, meta):
    """(images, labels) of the reviewed images in a processed version, any split, or None.

    The version's manifest.jsonl keeps each image's raw key, sha256 and shard: reviewed images are
    the rows whose key is a reviewed name; only their shards are read."""
    rows = [r for r in read_local_manifest(folder) if is_reviewed_key(r.get("key") or "")]
    if not rows:
        return None
    if all(r.get("shard") for r in rows):
        shards = sorted({r["shard"] for r in rows})
    else:
        shards = [name for split_shards in meta.shards.values() for name in split_shards]
    images, y = load_examples_by_sha256(folder, meta, shards, {r["sha256"] for r in rows})
    return (images, y) if len(y) else None


def log_reviewed_metrics(client, run_id: str, reviewed: dict) -> None:
    """`reviewed_n`, `reviewed_<metric>` and `reviewed_champion_<metric>` on the candidate's run."""
    from mlflow.entities import Metric

    figures = {"reviewed_n": float(reviewed["n"])}
    for who, prefix in (("candidate", "reviewed_"), ("champion", "reviewed_champion_")):
        if reviewed.get(who):
            figures.update(scalar_metrics({k: v for k, v in reviewed[who].items() if k != "n"}, prefix))
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in sorted(figures.items())])


def evaluate_against_champion(dataset: str, model_version: str, settings: Settings | None = None) -> dict:
    """Candidate and @champion, both evaluated via their bundles on the candidate's test split as
    they would answer when served (each with TTA or not: `contracts.tta.uses_tta`; `tta` is the
    candidate's), and on the version's reviewed images (`reviewed`, recorded, not gated on)."""
    from contracts.tta import on_by_default, uses_tta

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
    reviewed = reviewed_examples(folder, meta)
    cand_bundle = download_bundle(client, candidate.run_id, s)
    task = cand_bundle.meta["task"]
    tta = uses_tta(s.inference_tta, on_by_default(cand_bundle.meta))
    result: dict[str, Any] = {
        "dataset": dataset,
        "model_name": name,
        "evaluated_on": ds_version,
        "test_images": int(len(y)),
        "task": task,
        "primary_metric": primary_metric(task),
        "tta": tta,
        "candidate": {"version": str(candidate.version), "run_id": candidate.run_id,
                      "metrics": evaluate_bundle(cand_bundle, images, y, tta),
                      # the out-of-scope detector's validation figures (recorded, not gated on)
                      "ood": (cand_bundle.meta.get("ood") or {}).get("validation")},
        "champion": None,
        "reviewed": {"n": 0 if reviewed is None else int(len(reviewed[1]))},
    }
    if reviewed is not None:
        result["reviewed"].update(candidate=evaluate_bundle(cand_bundle, *reviewed, tta=tta), champion=None)
    champ = alias_version(client, name, CHAMPION)
    if champ is not None:
        result["champion"], champ_bundle = _champion_entry(client, s, champ, candidate, cand_bundle, meta)
        entry = result["champion"]
        if entry.get("same_as_candidate"):
            entry["metrics"] = result["candidate"]["metrics"]
            if reviewed is not None:
                result["reviewed"]["champion"] = result["reviewed"]["candidate"]
        elif champ_bundle is not None:
            entry["tta"] = uses_tta(s.inference_tta, on_by_default(champ_bundle.meta))
            entry["metrics"] = evaluate_bundle(champ_bundle, images, y, entry["tta"])
            if reviewed is not None:
                result["reviewed"]["champion"] = evaluate_bundle(champ_bundle, *reviewed, tta=entry["tta"])
    log_reviewed_metrics(client, candidate.run_id, result["reviewed"])
    return result


def _champion_entry(client, s: Settings, champ, candidate, cand_bundle, meta) -> tuple[dict, Any]:
    """The champion's entry (metrics still None) and its bundle when it is comparable, else None."""
    entry: dict[str, Any] = {"version": str(champ.version), "run_id": champ.run_id,
                             "dataset_version": champ.tags.get("dataset_version"), "metrics": None}
    if str(champ.version) == str(candidate.version):
        entry["same_as_candidate"] = True
        return entry, None
    champ_bundle = download_bundle(client, champ.run_id, s)
    if champ_bundle.meta["labels"] != cand_bundle.meta["labels"]:
        entry["incomparable"] = f"labels differ ({champ_bundle.meta['labels']} vs {cand_bundle.meta['labels']})"
    elif int(champ_bundle.meta["image_size"]) != meta.image_size:
        entry["incomparable"] = f"image size differs ({champ_bundle.meta['image_size']} vs {meta.image_size})"
    else:
        return entry, champ_bundle
    return entry, None


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
           "ood": comparison["candidate"].get("ood"),
           "tta": bool(comparison.get("tta", False)),  # figures of view-averaged answers (INFERENCE_TTA)
           # figures on reviewed images (recorded, not gated on)
           "reviewed": comparison.get("reviewed", {"n": 0})}
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
