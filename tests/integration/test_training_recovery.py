"""Idempotent recovery and the fail-closed gate, against the real MLflow + SeaweedFS of the test stack.

Three tiny models are trained once for the module (a good one, a confidently wrong one and
one with other labels). Each test then registers versions of those trained runs under its
own registered model (`_register_copy`: a real `mlflow.register_model` of the run's logged
model, with its processed data written under the test's dataset), so every test starts
from an empty registry without training again.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, TINY_TRAIN, write_processed_version

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OTHER_CLASSES = {"Blast": "blast", "Benign": "benign"}
# Floors that let the confidently wrong model become a first champion.
NO_FLOORS = {"gate_min_balanced_accuracy": 0.0, "gate_min_sensitivity": 0.0, "gate_min_accuracy": 0.0}
REGISTERED_TAGS = ("dataset_version", "git_commit", "task", "threshold")
# What each kind of trained model is made from (write_processed_version arguments).
KINDS = {
    "good": {"classes": TINY_CLASSES, "positive_label": "abnormal", "seed": 3},
    "weak": {"classes": TINY_CLASSES, "positive_label": "abnormal", "seed": 3, "swap_labels": True},
    "other": {"classes": OTHER_CLASSES, "positive_label": "blast", "seed": 6,
              "counts": {split: {"blast": n["abnormal"], "benign": n["normal"]} for split, n in TINY_COUNTS.items()}},
}


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def _processed(s, dataset: str, kind: str, dataset_version: str | None = None) -> str:
    spec = KINDS[kind]
    return write_processed_version(s, dataset, spec["classes"], spec.get("counts", TINY_COUNTS),
                                   positive_label=spec["positive_label"],
                                   dataset_version=dataset_version, seed=spec["seed"],
                                   swap_labels=spec.get("swap_labels", False))


@pytest.fixture(scope="module")
def trained(local_stack) -> dict:
    """{settings, dataset, <kind>: train_candidate result} for the three kinds, none gated."""
    from training.train import train_candidate

    s = local_stack.model_copy(update=TINY_TRAIN)
    dataset = f"tinyrecov{secrets.token_hex(3)}"
    out = {"settings": s, "dataset": dataset}
    for kind in KINDS:
        out[kind] = train_candidate(dataset, _processed(s, dataset, kind), s)
        assert out[kind]["skipped"] is False, out[kind]
    return out


def _register_copy(trained: dict, dataset: str, kind: str) -> str:
    """Register the `kind` model's trained run as a new version of `dataset`'s model; returns the version."""
    import mlflow

    s = trained["settings"]
    client = _client(s)
    source = client.get_model_version(s.model_name(trained["dataset"]), trained[kind]["model_version"])
    _processed(s, dataset, kind, dataset_version=source.tags["dataset_version"])
    # The tags training registers (not the gate's), under a config hash no training computes.
    tags = {k: v for k, v in source.tags.items() if k in REGISTERED_TAGS or k.startswith("metric.")}
    tags.update(dataset=dataset, config_hash=f"copy-{secrets.token_hex(4)}")
    return str(mlflow.register_model(source.source, s.model_name(dataset), tags=tags).version)


def _with_champion(trained: dict, prefix: str, champion_kind: str) -> tuple:
    """A fresh registered model: @champion is a copy of `champion_kind`, the candidate a copy of `good`."""
    from training.gate import promote_if_better

    s = trained["settings"]
    dataset = f"{prefix}{secrets.token_hex(3)}"
    champion = _register_copy(trained, dataset, champion_kind)
    candidate = _register_copy(trained, dataset, "good")
    assert promote_if_better(dataset, champion, s.model_copy(update=NO_FLOORS))["decision"]["passed"]
    return s, dataset, champion, candidate


def _alias(s, dataset: str, alias: str) -> str | None:
    from training.registry import alias_version

    found = alias_version(_client(s), s.model_name(dataset), alias)
    return str(found.version) if found is not None else None


def _history(s, dataset: str) -> list[dict]:
    from training.registry import status

    return status(dataset, s)["history"]


def test_a_registered_but_ungated_version_is_gated_on_the_next_run(trained):
    """Evaluate/gate/promote failed after train: the next run must gate that version, not skip it."""
    from training.gate import promote_if_better
    from training.train import train_candidate

    s, dataset, weak = trained["settings"], trained["dataset"], trained["weak"]
    client = _client(s)
    versions_before = len(client.search_model_versions(f"name='{s.model_name(dataset)}'"))
    again = train_candidate(dataset, weak["dataset_version"], s)
    assert again["skipped"] is False and again["resumed"] is True, again
    assert again["model_version"] == weak["model_version"] and again["run_id"] == weak["run_id"]
    assert "no gate decision yet" in again["reason"]
    gate = promote_if_better(dataset, again["model_version"], s)  # what the DAG's next tasks do
    assert gate["decision"]["passed"] is False and "below floor" in gate["decision"]["reason"]
    third = train_candidate(dataset, weak["dataset_version"], s)
    assert third["skipped"] is True and "gate decision: failed" in third["reason"]
    assert len(client.search_model_versions(f"name='{s.model_name(dataset)}'")) == versions_before


def test_apply_gate_refuses_when_the_champion_moved_since_evaluate(trained):
    from training.gate import decide_gate, evaluate_against_champion, promote_if_better
    from training.registry import ChampionMoved, apply_gate

    s, dataset, first, candidate = _with_champion(trained, "tinycas", "weak")
    name = s.model_name(dataset)
    other = _register_copy(trained, dataset, "weak")
    decision = decide_gate(evaluate_against_champion(dataset, candidate, s), s)
    assert decision["passed"] and decision["compared_champion"] == first
    _client(s).set_registered_model_alias(name, "champion", other)  # moved by someone else meanwhile

    with pytest.raises(ChampionMoved, match=f"is v{other} but the decision was made against v{first}"):
        apply_gate(dataset, candidate, decision, s)
    assert _alias(s, dataset, "champion") == other
    assert "gate_decision" not in _client(s).get_model_version(name, candidate).tags
    assert [e["event"] for e in _history(s, dataset)] == ["promoted"]
    # From a consistent state (evaluate again) the gate goes through.
    again = promote_if_better(dataset, candidate, s)
    assert again["applied"]["champion"] == candidate and again["applied"]["previous"] == other
    assert _alias(s, dataset, "previous-champion") == other


def test_a_retried_promote_keeps_the_previous_champion(trained):
    from training.gate import promote_if_better
    from training.registry import apply_gate

    s, dataset, first, candidate = _with_champion(trained, "tinyretry", "weak")
    name = s.model_name(dataset)
    client = _client(s)
    promoted = promote_if_better(dataset, candidate, s)
    assert promoted["decision"]["passed"] and promoted["applied"]["previous"] == first

    retry = apply_gate(dataset, candidate, promoted["decision"], s)  # Airflow retries the promote task
    assert _alias(s, dataset, "champion") == candidate and _alias(s, dataset, "previous-champion") == first
    assert client.get_model_version(name, candidate).tags["previous_champion_version"] == first
    assert retry["champion"] == candidate and retry["previous"] == first and retry["already_champion"]
    # A first try that stopped after moving @champion: the retry restores the recorded previous champion.
    client.delete_registered_model_alias(name, "previous-champion")
    again = apply_gate(dataset, candidate, promoted["decision"], s)
    assert again["previous"] == first and _alias(s, dataset, "previous-champion") == first
    assert [(e["event"], e["version"]) for e in _history(s, dataset)] == [("promoted", first),
                                                                          ("promoted", candidate)]


def test_an_incomparable_champion_needs_a_person(trained):
    from contracts.settings import PROJECT_ROOT
    from training.gate import promote_if_better

    s, dataset, champion, candidate = _with_champion(trained, "tinyincomp", "other")
    name = s.model_name(dataset)
    gate = promote_if_better(dataset, candidate, s)
    assert "labels differ" in gate["comparison"]["champion"]["incomparable"]
    assert gate["decision"]["passed"] is False and gate["decision"]["needs_review"] is True
    assert "needs a person" in gate["decision"]["reason"]
    assert _alias(s, dataset, "champion") == champion and _alias(s, dataset, "challenger") == candidate
    assert _client(s).get_model_version(name, candidate).tags["gate_decision"] == "needs_review"

    env = {**os.environ, **{k.upper(): str(v) for k, v in TINY_TRAIN.items()}}
    cmd = [sys.executable, "-m", "training", "promote", "--dataset", dataset, "--version", candidate]

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd + list(extra), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    plain = cli()
    assert plain.returncode == 0 and "NEEDS A PERSON" in plain.stdout, plain.stdout + plain.stderr
    blank = cli("--reason", " ", "--by", "dr-lee")
    assert blank.returncode == 1 and "needs a reason" in blank.stderr
    assert _alias(s, dataset, "champion") == champion
    person = cli("--reason", "new label set approved by the lab", "--by", "dr-lee")
    assert person.returncode == 0, person.stdout + person.stderr
    assert _alias(s, dataset, "champion") == candidate and _alias(s, dataset, "previous-champion") == champion
    tags = _client(s).get_model_version(name, candidate).tags
    assert tags["promoted_by"] == "dr-lee" and "new label set approved by the lab" in tags["gate_reason"]
    last = _history(s, dataset)[-1]
    assert last["event"] == "promoted" and last["by"] == "dr-lee"


def test_run_params_cannot_lower_the_configured_floors_or_margin(trained):
    from training.gate import decide_gate, evaluate_against_champion, promote_if_better, run_settings
    from training.registry import apply_gate

    s = trained["settings"]  # configured floors 0.5
    dataset = f"tinyfloors{secrets.token_hex(3)}"
    weak = _register_copy(trained, dataset, "weak")
    lowered = {**NO_FLOORS, "gate_margin": 0.0}
    decision = decide_gate(evaluate_against_champion(dataset, weak, s), s, overrides=lowered)
    assert decision["passed"] is False and "< floor 0.5000" in decision["reason"]
    # The DAG's tasks get their settings from run_settings: the same floors reach the registry.
    run = run_settings(s, lowered)
    gate = promote_if_better(dataset, weak, run)
    assert gate["decision"]["passed"] is False and _alias(s, dataset, "champion") is None
    # Raising works: a margin no candidate can clear keeps the champion.
    promote_if_better(dataset, weak, s.model_copy(update=NO_FLOORS))
    good = _register_copy(trained, dataset, "good")
    comparison = evaluate_against_champion(dataset, good, s)
    assert decide_gate(comparison, s)["passed"] is True
    strict = decide_gate(comparison, s, overrides={"gate_margin": 1.0})
    assert strict["passed"] is False and "does not beat" in strict["reason"]
    apply_gate(dataset, good, strict, s)
    assert _alias(s, dataset, "champion") == weak


CONTENDER = """
import json, sys, time
from pathlib import Path
import mlflow, tensorflow  # noqa: F401 - heavy imports before the start line
from training.train import train_candidate
dataset, version, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(json.dumps(train_candidate(dataset, version), default=str))
"""


def test_two_processes_training_the_same_configuration_register_one_version(local_stack, tmp_path):
    """The CLI and the DAG start the same training at the same moment: one version, one trained run."""
    from contracts.settings import PROJECT_ROOT
    from training.tracking import config_hash

    s = local_stack.model_copy(update=TINY_TRAIN)
    dataset = f"tinyrace{secrets.token_hex(3)}"
    version = _processed(s, dataset, "good")
    env = {**os.environ, **{k.upper(): str(v) for k, v in TINY_TRAIN.items()}}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, dataset, version, str(tmp_path / f"ready{i}"), str(go)],
                              cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "contenders did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    client = _client(s)
    versions = client.search_model_versions(f"name='{s.model_name(dataset)}'")
    assert len(versions) == 1, results
    winner = next(r for r in results if not r["skipped"])
    loser = next(r for r in results if r is not winner)
    assert winner["model_version"] == str(versions[0].version) and winner["resumed"] is False, results
    assert loser["skipped"] is True and loser["run_id"] == winner["run_id"]
    assert f"run {winner['run_id']}" in loser["reason"] and "stood down" in loser["reason"]
    exp = client.get_experiment_by_name(s.model_name(dataset))
    chash = config_hash(s, dataset, version)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], f"tags.config_hash = '{chash}'")}
    assert runs[winner["run_id"]].info.status == "FINISHED"
    stood_down = runs[loser["stood_down_run_id"]]
    assert stood_down.info.status == "KILLED" and stood_down.data.tags["duplicate_of"] == winner["run_id"]


def test_only_live_claims_count(local_stack):
    """A claim of a process that is gone (same host), silent for too long (any host: a lost worker
    container) or older than the expiry does not block training."""
    from training.claim import (CLAIM_STALE_S, TAG_HEARTBEAT, TAG_HOST, TAG_PID, TAG_PID_START, claim_expiry_s,
                                claim_tags, heartbeat, host_id, live_claims)
    from training.tracking import experiment_id

    s = local_stack.model_copy(update=TINY_TRAIN)
    client = _client(s)
    exp = experiment_id(client, f"claims-{secrets.token_hex(3)}")
    chash = "claimtest"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now_ms = int(time.time() * 1000)

    def claim(tags: dict, start_ms: int) -> str:
        return client.create_run(exp, start_time=start_ms, tags={"config_hash": chash, **tags}).info.run_id

    dead = claim({TAG_HOST: host_id(), TAG_PID: gone.stdout.strip(), TAG_PID_START: "1"}, now_ms - 60_000)
    expired = claim({TAG_HOST: "elsewhere/pid:[1]", TAG_PID: "1", TAG_PID_START: "1"},
                    now_ms - int(claim_expiry_s(s) * 1000) - 60_000)
    elsewhere = claim({TAG_HOST: "elsewhere/pid:[1]", TAG_PID: "1", TAG_PID_START: "1"}, now_ms - 30_000)
    silent_s = time.time() - CLAIM_STALE_S - 60
    lost = claim({TAG_HOST: "elsewhere/pid:[2]", TAG_PID: "1", TAG_PID_START: "1", TAG_HEARTBEAT: str(int(silent_s))},
                 int(silent_s * 1000))
    mine = claim(claim_tags(), now_ms)
    finished = claim(claim_tags(), now_ms - 90_000)
    client.set_terminated(finished, "FINISHED")
    assert [r.info.run_id for r in live_claims(client, exp, chash, s)] == [elsewhere, mine]
    assert dead and expired and lost  # created, and ignored

    with heartbeat(client, lost, every_s=0.2):  # its owner beats again: the claim holds once more
        time.sleep(1.0)
    assert lost in [r.info.run_id for r in live_claims(client, exp, chash, s)]
