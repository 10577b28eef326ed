"""Benchmark: "add 5 % new images" on a private local stack, one run (issue 14 item 4).

    .venv/bin/python benchmarks/incremental.py [--data ../shared/data/leukemia] [--epochs N]

1. upload 95 % of the data (every image whose path hashes into the other 19 of 20 buckets),
   run the pipeline (ingest -> validate -> preprocess: the full run), train a candidate from
   scratch and promote it (the champion), load it the way serving does (ModelManager.reload);
2. upload the other 5 %, run the pipeline again (incremental: prepared-pixel cache, untouched
   shards copied), then time a full preprocess of the same version on a clean processed state
   (raw cache kept, as after any ingest): the "+5 %" preprocess vs a full one;
3. train on the new version from scratch (full) and warm-started from the champion, with the
   same settings; per epoch the validation accuracy and the time since train_candidate was
   called; warm start's time to reach the full run's best validation accuracy vs the full
   run's time; promote the better one and time serving's reload of the new champion.
Prints every figure and the issue-14 targets. `--epochs` caps both trainings (default: EPOCHS).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOLD_OUT_BUCKETS = 20  # 1 of 20 = 5 %


def split_tree(data: Path, target: Path) -> int:
    """Copy the 95 % part of `data` (folder per class) into `target`; returns images held out."""
    held = 0
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = path.relative_to(data)
        if int(hashlib.sha256(str(rel).encode()).hexdigest(), 16) % HOLD_OUT_BUCKETS == 0:
            held += 1
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
    return held


def timed_training(dataset: str, version: str, settings, warm_start: bool) -> dict:
    """train_candidate with per-epoch (seconds since the call, val_accuracy)."""
    from training.train import train_candidate

    curve: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    def on_epoch(epoch: int, logs: dict) -> None:
        curve.append((time.perf_counter() - t0, float(logs.get("val_accuracy", float("nan")))))

    result = train_candidate(dataset, version, settings, on_epoch=on_epoch, warm_start=warm_start)
    result["wall_s"] = time.perf_counter() - t0
    result["curve"] = curve
    return result


def serve_reload_s(settings) -> tuple[float, str]:
    """Seconds for serving's registry follower to load the champion (download, verify, canaries)."""
    from serving.manager import ModelManager
    from serving.metrics import ServingMetrics

    t0 = time.perf_counter()
    outcome = ModelManager(settings, ServingMetrics()).reload(force=True, trigger="benchmark")
    assert outcome.ok and outcome.changed, outcome
    return time.perf_counter() - t0, f"serving v{outcome.version}"


def _champion(dataset: str, version: str, settings) -> dict:
    """Train from scratch on the 95 % version, promote it, load it the way serving does."""
    from training.gate import promote_if_better

    champion = timed_training(dataset, version, settings, warm_start=False)
    gate = promote_if_better(dataset, champion["model_version"], settings)
    print(f"95 %: trained v{champion['model_version']} in {champion['wall_s']:.0f} s, "
          f"gate passed={gate['decision']['passed']}")
    assert gate["decision"]["passed"], "the scenario needs a champion (short runs: lower GATE_MIN_* in the env)"
    served_s, outcome = serve_reload_s(settings)
    print(f"95 %: serving reload {served_s:.1f} s ({outcome})")
    return champion


def clean_processed(settings, dataset: str) -> None:
    """Forget processed versions, stored shards and the prepared cache; keep raw images and manifests."""
    from pipeline.storage import iter_objects, s3_client

    client = s3_client(settings)
    keys = [{"Key": o["Key"]} for o in iter_objects(client, settings.s3_bucket, f"processed/{dataset}/")]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=settings.s3_bucket, Delete={"Objects": keys[i:i + 1000]})
    for sub in ("processed", "prepared", "shards"):
        shutil.rmtree(settings.hemaflow_home / "cache" / sub, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "leukemia")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-path-only", action="store_true",
                        help="steps 1-2 without training or serving (ingest, validate, preprocess figures only)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the stack (finally) when killed
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data", file=sys.stderr)
        return 2

    from ops.stack import private_stack_env

    home = Path(tempfile.mkdtemp(prefix="hemaflow-bench-incr-"))
    os.environ.update(private_stack_env(home, bucket="hemaflow-bench"))
    os.environ["DATASET"] = "leukemia"
    from contracts.settings import get_settings
    from ops import stack
    from pipeline.preprocess import preprocess
    from pipeline.run import run_pipeline
    from pipeline.upload import upload_tree
    from training.gate import promote_if_better

    settings = get_settings()
    if args.epochs:
        settings = settings.model_copy(update={"epochs": args.epochs})
    dataset = "leukemia"
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    try:
        stack.up(settings)
        part = home / "part"
        held = split_tree(args.data, part)
        upload_tree(part, dataset, settings, emit_asset_event=False)
        t0 = time.perf_counter()
        first = run_pipeline(dataset, settings)
        first_s = time.perf_counter() - t0
        print(f"95 %: pipeline {first_s:.1f} s {first['timings']} -> {first['preprocess']['message']}")
        if not args.data_path_only:
            champion = _champion(dataset, first["preprocess"]["dataset_version"], settings)
        upload_tree(args.data, dataset, settings, emit_asset_event=False)  # + the held-out 5 %
        t0 = time.perf_counter()
        second = run_pipeline(dataset, settings)
        second_s = time.perf_counter() - t0
        version = second["preprocess"]["dataset_version"]
        incr_pre = second["timings"]["preprocess_s"]
        print(f"+5 % ({held} images): pipeline {second_s:.1f} s {second['timings']} -> "
              f"{second['preprocess']['message']}")
        clean_processed(settings, dataset)
        t0 = time.perf_counter()
        full = preprocess(second["validate"]["validated_key"], dataset, settings)
        full_pre = time.perf_counter() - t0
        assert full.dataset_version == version and full.created, "same data must give the same version"
        print(f"full preprocess of the same version {full_pre:.1f} s -> {full.message}")

        print()
        print(f"shared 2-core machine, {os.cpu_count()} CPUs visible; {held} images added to "
              f"{first['ingest']['total']}; EPOCHS={settings.epochs}")
        print(f"+5 % preprocess / full preprocess   {incr_pre:6.1f} / {full_pre:6.1f} s = "
              f"{incr_pre / full_pre:5.1%}   (target <= 15 %)")
        print(f"+5 % pipeline (ingest+validate+preprocess) {second_s:.1f} s vs the 95 % run {first_s:.1f} s")
        if args.data_path_only:
            return 0
        cold = timed_training(dataset, version, settings, warm_start=False)
        warm = timed_training(dataset, version, settings, warm_start=True)
        assert warm["warm_started_from"] == champion["model_version"], warm.get("warm_started_from")
        target = max(acc for _, acc in cold["curve"])
        cold_s = cold["curve"][-1][0]
        reach = next((t for t, acc in warm["curve"] if acc >= target), None)
        for name, run in (("full", cold), ("warm", warm)):
            print(f"{name:>4}: {len(run['curve'])} epochs, fit {run['curve'][-1][0]:.0f} s, train_candidate "
                  f"{run['wall_s']:.0f} s, val_accuracy per epoch "
                  + " ".join(f"{acc:.3f}@{t:.0f}s" for t, acc in run["curve"])
                  + f", test balanced accuracy {run['metrics'].get('balanced_accuracy', float('nan')):.4f}")
        best = max((cold, warm), key=lambda r: r["metrics"].get("balanced_accuracy", 0))
        t0 = time.perf_counter()
        gate = promote_if_better(dataset, best["model_version"], settings)
        gate_s = time.perf_counter() - t0
        served_s, outcome = serve_reload_s(settings)
        print(f"promote v{best['model_version']}: gate {gate_s:.1f} s passed={gate['decision']['passed']}; "
              f"serving reload {served_s:.1f} s ({outcome})")

        if reach is None:
            print(f"warm start never reached the full run's best val_accuracy {target:.3f} "
                  f"(its best {max(a for _, a in warm['curve']):.3f}); full run fit {cold_s:.0f} s")
        else:
            print(f"warm start reached the full run's best val_accuracy {target:.3f} after {reach:.0f} s, "
                  f"full run {cold_s:.0f} s = {reach / cold_s:5.1%}   (target <= 33 %)")
    finally:
        stack.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
