"""Accuracy benchmark: upload -> ingest -> validate -> preprocess -> train -> gate on real data.

    .venv/bin/python benchmarks/accuracy.py --dataset leukemia|pbc8 [--home DIR] [--keep]

Starts a private local stack (SeaweedFS + MLflow on free ports, temporary HEMAFLOW_HOME
unless --home is given), uploads ../shared/data/<dataset>, runs the pipeline stages and
trains with the SHIPPED DEFAULTS (settings.py / environment), then prints the test-split
figures, wall times, peak RSS, and behavioural checks of the served (TFLite) model:
prediction stability under flips and 90-degree rotations of the test images.
Targets: leukemia sensitivity >= 0.98 at specificity >= 0.95, training <= 15 min on 2
cores; pbc8 accuracy >= 0.95. The threshold is chosen on validation, never on test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {
    "leukemia": {"sensitivity": 0.98, "specificity": 0.95},
    "pbc8": {"accuracy": 0.95},
}
SHOWN = {
    "leukemia": ("sensitivity", "specificity", "roc_auc", "balanced_accuracy", "accuracy", "threshold", "ece"),
    "pbc8": ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc", "ece"),
}


def _stack_env(home: Path) -> dict[str, str]:
    """Ports persist in the home so that --home reuses the same stack between runs."""
    from ops.stack import private_stack_env

    saved = home / "bench-env.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    env = private_stack_env(home, bucket="hemaflow-bench")
    home.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(env))
    return env


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def behaviour_checks(bundle, images) -> dict[str, float]:
    """Agreement of predicted labels (and mean |dp|) between original and transformed images."""
    import numpy as np

    from training.evaluate import predict_labels

    runner = bundle.runner()
    meta = bundle.meta
    base_p = runner.predict_proba(images.astype(np.float32))
    base = predict_labels(base_p, meta["labels"], meta.get("positive_label"), meta.get("threshold"))
    out = {}
    transforms = {
        "flip_lr": lambda x: x[:, :, ::-1],
        "flip_ud": lambda x: x[:, ::-1],
        "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
        "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
        "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    }
    for name, fn in transforms.items():
        p = runner.predict_proba(np.ascontiguousarray(fn(images)).astype(np.float32))
        pred = predict_labels(p, meta["labels"], meta.get("positive_label"), meta.get("threshold"))
        out[f"{name}_agreement"] = float(np.mean(pred == base))
        out[f"{name}_mean_abs_dp"] = float(np.mean(np.abs(p - base_p)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(TARGETS), required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--home", type=Path, default=None, help="reuse this HEMAFLOW_HOME (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (with --home)")
    args = parser.parse_args(argv)
    source = args.data / args.dataset
    if not source.is_dir():
        print(f"no data at {source}", file=sys.stderr)
        return 2

    os.environ["HEMAFLOW_ENV_FILE"] = ""  # shipped defaults, not a developer's .env
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tmp = None if args.home else tempfile.TemporaryDirectory(prefix="hemaflow-bench-")
    home = args.home or Path(tmp.name)
    os.environ.update(_stack_env(home))

    from ops import stack
    from pipeline.run import run_pipeline
    from contracts.settings import get_settings
    from pipeline.upload import upload_tree

    settings = get_settings()
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    started = time.perf_counter()
    try:
        stack.up(settings)
        t0 = time.perf_counter()
        uploaded = upload_tree(source, args.dataset, settings)
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = run_pipeline(args.dataset, settings)
        pipeline_s = time.perf_counter() - t0
        version = pipe["preprocess"]["dataset_version"]

        from training.data import load_split_arrays
        from training.gate import download_bundle, promote_if_better
        from training.tracking import mlflow_client
        from training.train import train_candidate

        def on_epoch(epoch: int, logs: dict) -> None:
            shown = " ".join(f"{k}={float(v):.4f}" for k, v in logs.items() if k != "learning_rate")
            print(f"  epoch {epoch + 1:>2}: {shown} [{time.perf_counter() - t_train:.0f}s]", flush=True)

        print(f"{args.dataset}: dataset_version {version} counts {json.dumps(pipe['preprocess'].get('counts'))}")
        t_train = time.perf_counter()
        trained = train_candidate(args.dataset, version, settings, on_epoch=on_epoch)
        train_s = time.perf_counter() - t_train
        gate = promote_if_better(args.dataset, trained["model_version"], settings)

        from contracts.processed import read_local_meta
        from pipeline.storage import fetch_processed

        folder = fetch_processed(args.dataset, version, settings)
        images, _ = load_split_arrays(folder, read_local_meta(folder), "test")
        bundle = download_bundle(mlflow_client(settings), trained["run_id"], settings)
        behaviour = behaviour_checks(bundle, images)
        test = gate["comparison"]["candidate"]["metrics"]
        total_s = time.perf_counter() - started

        print()
        print(f"== {args.dataset} accuracy benchmark (shipped defaults, test split, served TFLite model) ==")
        print(f"images: uploaded {uploaded.get('uploaded')} skipped {uploaded.get('skipped')}; "
              f"test images {test['n']}")
        print("test: " + "  ".join(f"{k}={test[k]:.4f}" for k in SHOWN[args.dataset] if test.get(k) is not None))
        for k, target in TARGETS[args.dataset].items():
            print(f"target {k} >= {target}: {'MET' if test[k] >= target else 'NOT MET'} ({test[k]:.4f})")
        print("confusion matrix (rows true, cols predicted; labels "
              f"{bundle.meta['labels']}): {test['confusion_matrix']}")
        print(f"training: {trained['epochs_run']} epochs, {train_s:.0f}s "
              f"({'<=' if train_s <= 900 else '>'} 15 min)  gate: {gate['decision']['reason']}")
        print("behaviour: " + "  ".join(f"{k}={v:.4f}" for k, v in behaviour.items()))
        print(f"wall: upload {upload_s:.0f}s  pipeline {pipeline_s:.0f}s  train {train_s:.0f}s  total {total_s:.0f}s")
        print(f"peak RSS (this process): {_peak_rss_mb():.0f} MB")
    finally:
        if not args.keep:
            stack.down(settings)
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
