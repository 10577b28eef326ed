"""Benchmark: the whole retraining DAG as a real Airflow run, first run and unchanged re-run.

Starts a fresh local stack (SeaweedFS + MLflow) on free ports in a temporary folder, with
its own Airflow home (SQLite), uploads ../shared/data/leukemia (not timed), then times
`airflow dags test hemaflow_retrain_<dataset>` (the same command `make demo` runs):
  1. first run: ingest -> validate -> preprocess -> train -> evaluate -> gate -> promote -> report;
  2. unchanged re-run: nothing new, training skipped.
Prints wall time of each run, per-task durations, the Airflow overhead (wall minus the sum of
task durations) and the re-run / first-run ratio. Targets (2 CPU cores): first run <= 15 min,
unchanged re-run <= 60 s. Settings come from the environment (defaults otherwise).

    nice -n 10 .venv/bin/python benchmarks/dag.py [--data DIR] [--dataset leukemia] [--conf '{"epochs": 5}']
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIRST_RUN_TARGET_S = 15 * 60
RERUN_TARGET_S = 60


def _task_durations(settings, dag_id: str, run_id: str, env: dict[str, str]) -> dict[str, tuple[str, float]]:
    from scripts.demo import airflow_cli

    done = airflow_cli(settings, ["tasks", "states-for-dag-run", dag_id, run_id, "-o", "json"], env, timeout_s=120)
    rows = next((json.loads(line) for line in done.stdout.splitlines() if line.startswith("[{")), [])
    out = {}
    for row in rows:
        start, end = row.get("start_date"), row.get("end_date")
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end else 0.0
        out[row["task_id"]] = (str(row.get("state")), seconds)
    return out


def _timed_run(settings, dataset: str, env: dict[str, str], conf: dict | None, label: str) -> float:
    from scripts.demo import run_retrain_dag

    start = time.monotonic()
    run = run_retrain_dag(settings, dataset, env, conf)
    wall = time.monotonic() - start
    tasks = _task_durations(settings, f"hemaflow_retrain_{dataset}", run["run_id"], env)
    busy = sum(seconds for _, seconds in tasks.values())
    print(f"\n{label}: {wall:.1f} s wall ({run['state']}); tasks {busy:.1f} s; Airflow overhead {wall - busy:.1f} s")
    for task_id, (state, seconds) in tasks.items():
        print(f"  {task_id:16s} {state:8s} {seconds:8.1f} s")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "leukemia")
    parser.add_argument("--dataset", default="leukemia")
    parser.add_argument("--conf", default="", help="JSON params for the runs (e.g. '{\"epochs\": 5}')")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stack folder")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data", file=sys.stderr)
        return 2
    conf = json.loads(args.conf) if args.conf else None

    from pipeline.stack import free_port, private_stack_env

    home = Path(tempfile.mkdtemp(prefix="hemaflow-bench-dag-"))
    os.environ.update({
        **private_stack_env(home, bucket="hemaflow-bench"), "AIRFLOW_PORT": str(free_port()),
        "SERVING_URL": f"http://127.0.0.1:{free_port()}",  # no serving: notify logs and continues
    })
    from pipeline import stack
    from pipeline.settings import get_settings
    from pipeline.upload import upload_tree
    from scripts.demo import airflow_env, champion_report, migrate_airflow_db

    settings = get_settings()
    try:
        stack.up(settings)
        t0 = time.monotonic()
        up = upload_tree(args.data, args.dataset, settings=settings)
        print(f"uploaded {up['uploaded']} images from {args.data} in {time.monotonic() - t0:.1f} s (not timed below)")
        print(f"settings: IMAGE_SIZE={settings.image_size} EPOCHS={settings.epochs} "
              f"TRAIN_INPUT_SIZE={settings.train_input_size} TRAIN_TIME_BUDGET_S={settings.train_time_budget_s} "
              f"conf={conf or {}}; cores={os.cpu_count()}")
        env = airflow_env(settings, home / "airflow")
        migrate_airflow_db(settings, env)
        first = _timed_run(settings, args.dataset, env, conf, "first run")
        rerun = _timed_run(settings, args.dataset, env, conf, "unchanged re-run")
        version, metrics = champion_report(settings, args.dataset)
        print(f"\nchampion: version {version} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        print(f"first run        {first:8.1f} s  (target <= {FIRST_RUN_TARGET_S} s: "
              f"{'met' if first <= FIRST_RUN_TARGET_S else 'MISSED'})")
        print(f"unchanged re-run {rerun:8.1f} s  (target <= {RERUN_TARGET_S} s: "
              f"{'met' if rerun <= RERUN_TARGET_S else 'MISSED'})")
        print(f"re-run / first   {rerun / first:8.3f}")
    finally:
        stack.down(settings)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
