"""Model registry: the aliases (never stages) and the events that move them.

The gate that decides (evaluation of candidate and champion, floors, margin) is `training.gate`;
this module applies its decisions to the aliases.

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
from datetime import datetime, timezone

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
    """Move the aliases according to `decision` and record why and when (compare-and-set on @champion);
    then the version's model card is re-rendered with the decision (training.model_card)."""
    from training.model_card import publish_card_quietly

    s = settings or get_settings()
    client = mlflow_client(s)
    applied = _move_aliases(client, s.model_name(dataset), str(model_version), decision)
    publish_card_quietly(client, s.model_name(dataset), str(model_version))
    return applied


def _move_aliases(client, name: str, version: str, decision: dict) -> dict:
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
