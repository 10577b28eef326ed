"""Run summaries, the failure callback's message and the tolerant serving notification."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from contracts.settings import get_settings
from contracts.stages import RunResults, StageResultError
from ops.notify import RELOAD_PATH, notify_serving
from ops.report import build_summary, failure_summary, summary_markdown
from ops.supervisor import free_port

INGEST = {"manifest_key": "manifests/leukemia/1.jsonl", "ingest_id": "1", "reviewed": 2, "new": 5, "changed": 0, "deleted": 1,
          "unchanged": 80, "total": 85}
VALIDATE = {"validated_key": "validation/x/validated.jsonl", "summary_key": "validation/x/summary.json",
            "gx_result_key": "validation/x/gx.json", "run_id": "v1", "quarantined": 1, "bad_fraction": 0.0118}
PREPROCESS = {"dataset_version": "abc123", "prefix": "processed/leukemia/abc123/", "created": True}
TRAINED = {"run_id": "r1", "model_version": "3", "skipped": False, "reason": "new dataset version"}


def test_summary_of_a_promotion_says_what_and_why():
    results = RunResults.from_dict({
        "ingest": INGEST, "validate": VALIDATE, "preprocess": PREPROCESS, "train": TRAINED,
        "gate": {"passed": True, "reason": "beats champion 2"},
        "applied": {"event": "promoted", "version": "3", "champion": "3"}, "notify": {"notified": False}})
    assert RunResults.from_dict(json.loads(json.dumps(results.to_dict()))) == results  # the DAG passes it as JSON
    s = build_summary("leukemia", results,
                      {"dag_id": "d", "run_id": "manual__1", "params": {"epochs": 2, "image_size": None}})
    assert s["trained"] and s["promoted"] and s["candidate_version"] == "3" and s["champion_version"] == "3"
    assert s["outcome"] == "model version 3 promoted to @champion: beats champion 2"
    assert s["ingested"]["new"] == 5 and s["quarantined"] == 1
    assert s["params"] == {"epochs": 2}
    md = summary_markdown(s)
    assert "promoted to @champion" in md and "Quarantined: 1" in md and '"epochs": 2' in md
    assert "reviewed images joined: 2" in md
    json.dumps(s)  # must be JSON-serialisable for XCom and MLflow


def test_summary_marks_a_strong_data_drift_against_the_champion():
    drift = {"level": "strong", "reference": "v-old (champion v2)", "detail": "colour: drifted: saturation"}
    s = build_summary("leukemia", RunResults.from_dict({"ingest": INGEST, "preprocess": PREPROCESS,
                                                        "train": {**TRAINED, "dataset_drift": drift}}))
    assert s["dataset_drift"] == drift
    assert "Data drift vs v-old (champion v2): **STRONG DRIFT** (colour: drifted: saturation)" in summary_markdown(s)
    quiet = build_summary("leukemia", RunResults.from_dict({"ingest": INGEST, "preprocess": PREPROCESS, "train": TRAINED}))
    assert quiet["dataset_drift"] is None and "Data drift" not in summary_markdown(quiet)


def test_report_shows_the_gate_figures_on_reviewed_images_or_says_none():
    reviewed = {"n": 4, "candidate": {"n": 4, "accuracy": 0.75, "balanced_accuracy": 0.8},
                "champion": {"n": 4, "accuracy": 0.5, "balanced_accuracy": 0.5}}
    gate = {"passed": False, "reason": "does not beat", "primary_metric": "balanced_accuracy", "reviewed": reviewed}
    s = build_summary("leukemia", RunResults.from_dict({"train": TRAINED, "gate": gate}))
    assert s["gate_reviewed"] == reviewed
    assert ("- Reviewed images at the gate (4, not gated on): candidate accuracy 0.7500, balanced_accuracy 0.8000; "
            "champion accuracy 0.5000, balanced_accuracy 0.5000") in summary_markdown(s)
    first = {**gate, "primary_metric": "macro_f1",
             "reviewed": {"n": 2, "candidate": {"accuracy": 1.0, "macro_f1": 1.0}, "champion": None}}
    md = summary_markdown(build_summary("pbc8", RunResults.from_dict({"train": TRAINED, "gate": first})))
    assert "(2, not gated on): candidate accuracy 1.0000, macro_f1 1.0000; champion not evaluated" in md
    none = build_summary("leukemia", RunResults.from_dict({"train": TRAINED, "gate": {**gate, "reviewed": {"n": 0}}}))
    assert "- Reviewed images at the gate: none in this dataset version" in summary_markdown(none)
    not_gated = build_summary("leukemia", RunResults.from_dict({"train": TRAINED}))
    assert "Reviewed images at the gate" not in summary_markdown(not_gated)


def test_summary_of_a_skipped_training_and_of_a_rejected_candidate():
    skipped = build_summary("leukemia", RunResults.from_dict({
        "ingest": INGEST, "train": {**TRAINED, "skipped": True, "reason": "already registered as v3"}}))
    assert not skipped["trained"] and not skipped["promoted"]
    assert skipped["outcome"] == "nothing to do: already registered as v3"
    rejected = build_summary("leukemia", RunResults.from_dict({
        "train": TRAINED, "gate": {"passed": False, "reason": "sensitivity 0.7"},
        "applied": {"event": "rejected", "version": "3", "champion": None}}))
    assert not rejected["promoted"] and rejected["kept_as_challenger"]
    assert rejected["champion_version"] is None  # no champion yet: the rejected candidate stays @challenger
    assert "not promoted, @champion unchanged: sensitivity 0.7" in rejected["outcome"]


def test_summary_of_a_run_on_an_empty_prefix_says_nothing_to_do():
    empty = build_summary("wbc4", RunResults.from_dict({"ingest": {**INGEST, "new": 0, "total": 0}}))
    assert empty["outcome"] == "nothing to do: no images under the dataset's raw prefix yet"
    assert not empty["trained"] and not empty["promoted"]


def test_run_results_name_a_missing_field_or_an_unknown_stage():
    with pytest.raises(StageResultError, match="TrainResult lacks model_version"):
        RunResults.from_dict({"train": {"run_id": "r1"}})
    with pytest.raises(StageResultError, match="unknown stages"):
        RunResults.from_dict({"keep_champion": {"champion": "3"}})  # a task id is not a stage result


def test_failure_summary_names_dag_run_task_error_and_impact():
    ctx = {"dag": SimpleNamespace(dag_id="hemaflow_retrain_leukemia"),
           "dag_run": SimpleNamespace(run_id="manual__2", dag_id="hemaflow_retrain_leukemia"),
           "ti": SimpleNamespace(task_id="validate", try_number=1, max_tries=2),
           "exception": ValueError("bad fraction 0.2 > 0.05")}
    text = failure_summary(ctx)
    assert "dag=hemaflow_retrain_leukemia run=manual__2 task=validate (attempt 1 of 3)" in text
    assert "ValueError: bad fraction 0.2 > 0.05" in text
    assert "@champion stays in service" in text and "quarantine" in text
    promote_ctx = {**ctx, "ti": SimpleNamespace(task_id="promote", try_number=3, max_tries=2)}
    assert "Check the registry aliases" in failure_summary(promote_ctx)
    assert "task=?" in failure_summary({})  # a sparse context never breaks the callback


def test_notify_serving_is_tolerant_when_serving_is_down_or_unconfigured():
    down = get_settings(serving_url=f"http://127.0.0.1:{free_port()}", serving_admin_api_keys="k1,k2")
    result = notify_serving(down)
    assert result["notified"] is False and "unreachable" in result["detail"]
    unconfigured = notify_serving(get_settings(serving_admin_api_keys=""))
    assert unconfigured["notified"] is False and "SERVING_ADMIN_API_KEYS" in unconfigured["detail"]


def test_notify_serving_posts_reload_with_the_first_admin_key():
    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers.get("X-API-Key")))
            self.send_response(200 if self.headers.get("X-API-Key") == "first" else 403)
            self.end_headers()
            self.wfile.write(b'{"model_version": "3"}')

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ok = notify_serving(get_settings(serving_url=url, serving_admin_api_keys=" first , second"))
        refused = notify_serving(get_settings(serving_url=url, serving_admin_api_keys="second"))
    finally:
        server.shutdown()
    assert ok["notified"] is True and ok["status"] == 200 and "model_version" in ok["detail"]
    assert refused["notified"] is False and refused["status"] == 403
    assert seen == [(RELOAD_PATH, "first"), (RELOAD_PATH, "second")]
