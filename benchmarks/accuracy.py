"""Accuracy benchmark: upload -> ingest -> validate -> preprocess -> train -> gate on real data.

    .venv/bin/python benchmarks/accuracy.py --dataset leukemia|pbc8|<spec> [--data DIR] [--home DIR] [--keep]
    .venv/bin/python benchmarks/accuracy.py --dataset NAME --direct     # no stack: same splits, same model
    .venv/bin/python benchmarks/accuracy.py --dataset NAME --folds 5    # k-fold over content-hash folds

Every mode prints 95 % bootstrap intervals (training.intervals). `--direct` trains the shipped
defaults in-process (training.experiment) on the pipeline's content-hash splits, reusing the
logits a `benchmarks/levers.py baseline` run saved for the same configuration; `--folds K`
trains K models, fold f held out, and reports the pooled out-of-fold figures with intervals
plus each fold's, and for every fold model it trains the robustness read-outs of
benchmarks/stain_shift.py (8-view TTA, re-stained test images: an other-lab proxy).
`--lever NAME` (with --direct/--folds) measures a benchmarks/levers.py lever the same way.
Temperature and threshold always come from that model's validation split.
A new dataset is measured the same way: add pipeline/specs/<name>.toml and point --data at
the folder that holds <name>/<class folder>/*.jpg.

Starts a private local stack (SeaweedFS + MLflow on free ports, temporary HEMAFLOW_HOME
unless --home is given), uploads ../shared/data/<dataset>, runs the pipeline stages and
trains with the SHIPPED DEFAULTS (settings.py / environment), then prints the test-split
figures, wall times, peak RSS, and behavioural checks of the served (TFLite) model:
prediction stability under flips and 90-degree rotations of the test images.
Targets (issue 10, TARGETS): leukemia sensitivity >= 0.99 at specificity >= 0.97, pbc8 macro
F1 >= 0.97, training <= 15 min on 2 cores. The threshold is chosen on validation, never on test.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {
    "leukemia": {"sensitivity": 0.99, "specificity": 0.97},  # issue 10
    "pbc8": {"macro_f1": 0.97},
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


def shown(dataset: str, binary: bool) -> tuple[str, ...]:
    from training.intervals import BINARY_FIGURES, MULTICLASS_FIGURES

    return SHOWN.get(dataset, BINARY_FIGURES if binary else MULTICLASS_FIGURES)


def evaluate_split(data, val_idx, val_logits, test_idx, test_logits, target_sensitivity: float,
                   threshold_rule: str) -> dict[str, Any]:
    """Temperature and threshold from validation; test figures, intervals and ECE before/after."""
    from training.calibration import fit_temperature, softmax
    from training.evaluate import choose_threshold, compute_metrics, expected_calibration_error
    from training.experiment import sensitivity_at_specificity
    from training.intervals import bootstrap_intervals

    t = fit_temperature(val_logits, data.y[val_idx])
    val_p, test_p = softmax(val_logits, t), softmax(test_logits, t)
    y_val, y_test = data.y[val_idx], data.y[test_idx]
    positive, threshold = data.positive_label, None
    if positive is not None:
        pos = data.labels.index(positive)
        threshold = choose_threshold(y_val == pos, val_p[:, pos], target_sensitivity, threshold_rule)
    out = {"temperature": t, "threshold": threshold,
           "metrics": compute_metrics(y_test, test_p, data.labels, positive, threshold),
           "intervals": bootstrap_intervals(y_test, test_p, data.labels, positive, threshold),
           "ece": {f"{name}_{when}": expected_calibration_error(y, softmax(z, tt))
                   for name, z, y in (("val", val_logits, y_val), ("test", test_logits, y_test))
                   for when, tt in (("before", 1.0), ("after", t))},
           "y_test": y_test, "p_test": test_p}
    if positive is not None:
        out["test_sens_at_spec97_roc"] = sensitivity_at_specificity(y_test == pos, test_p[:, pos], 0.97)
    return out


def print_evaluation(title: str, dataset: str, ev: dict[str, Any]) -> None:
    from training.intervals import format_intervals

    binary = ev["threshold"] is not None
    print(f"== {title} ==")
    print(f"n={ev['metrics']['n']}  " + format_intervals(ev["intervals"], shown(dataset, binary)))
    if binary:
        print(f"threshold (from validation) {ev['threshold']:.4f}; ROC read-out on test (threshold picked "
              f"on test, optimistic): sensitivity at specificity >= 0.97 = {ev['test_sens_at_spec97_roc']:.4f}")
    print(f"temperature {ev['temperature']:.3f}; ECE " + "  ".join(f"{k}={v:.4f}" for k, v in ev["ece"].items()))
    for k, target in TARGETS.get(dataset, {}).items():
        row = ev["intervals"].get(k)
        if row:
            verdict = "MET" if row["low"] >= target else ("MET (point only)" if row["value"] >= target else "NOT MET")
            print(f"target {k} >= {target}: {verdict} ({row['value']:.4f} [{row['low']:.4f}, {row['high']:.4f}])")
    print("confusion matrix (rows true, cols predicted): " + str(ev["metrics"]["confusion_matrix"]))


def direct(args) -> int:
    """No stack: the shipped defaults on the pipeline's splits (or K content-hash folds)."""
    import numpy as np

    from benchmarks.levers import CACHE, LEVERS
    from contracts.dataset_spec import load_spec, training_settings
    from contracts.settings import get_settings
    from training import experiment as ex
    from training.intervals import bootstrap_intervals

    s = training_settings(get_settings(), args.dataset)  # the spec's [training] table, as training applies it
    spec = load_spec(args.dataset)
    changes = dict(LEVERS[args.lever])
    crop = changes.pop("crop", spec.crop)  # a crop lever changes the decoded images, not the Lever
    data = ex.load_folder(args.data / args.dataset, spec, s.image_size, crop, CACHE)
    lever = ex.lever_from_settings(s, name=args.lever, **changes)
    print(f"{args.dataset}: {len(data.y)} unique images, labels {data.labels}, crop {crop}, "
          f"configuration {vars(lever)}")
    if not args.folds:
        idx = ex.pipeline_splits(data, s)
        saved = CACHE / f"logits-{ex.lever_key(args.dataset, crop, lever)}.npz"
        if not saved.is_file():
            print(ex.fit_and_score(data, idx, lever, s.train_time_budget_s, save_logits=saved))
        z = np.load(saved)
        ev = evaluate_split(data, z["val_idx"], z["val_logits"], z["test_idx"], z["test_logits"],
                            s.target_sensitivity, s.threshold_rule)
        print_evaluation(f"{args.dataset} test split (pipeline content-hash split; {int(z['epochs_run'])} epochs, "
                         f"stop {z['stop_reason']}, fit {float(z['fit_s']):.0f}s)", args.dataset, ev)
        return 0
    pooled: dict[str, tuple[list, list]] = {}
    rows = []
    for fold in range(args.folds):
        idx = ex.fold_splits(data, args.folds, fold, s.split_salt)
        saved = CACHE / f"logits-{ex.lever_key(args.dataset, crop, lever, f'fold{fold}of{args.folds}')}.npz"
        if not saved.is_file():
            ex.fit_and_score(data, idx, lever, s.train_time_budget_s, save_logits=saved,
                             extra_arrays=_fold_extras(args, data, idx, s.image_size))
        z = np.load(saved)
        title = f"fold {fold + 1}/{args.folds} ({int(z['epochs_run'])} epochs, {float(z['fit_s']):.0f}s)"
        for variant, (val_logits, test_logits) in _variants(z).items():
            ev = evaluate_split(data, z["val_idx"], val_logits, z["test_idx"], test_logits, s.target_sensitivity,
                                s.threshold_rule)
            if variant == PLAIN:
                print_evaluation(title, args.dataset, ev)
                rows.append({k: ev["intervals"][k]["value"] for k in ev["intervals"]})
            else:
                print(f"  {variant}: " + "  ".join(f"{k}={ev['intervals'][k]['value']:.4f}"
                                                  for k in shown(args.dataset, ev["threshold"] is not None)
                                                  if k in ev["intervals"]))
            ys, ps = pooled.setdefault(variant, ([], []))
            ys.append(ev["y_test"])
            ps.append(_centred_on_threshold(ev["p_test"], data, ev["threshold"]))
    from training.intervals import format_intervals

    keys = list(rows[0])
    binary = data.positive_label is not None
    print(f"== {args.dataset} {args.folds}-fold (content-hash folds, every image tested once; {lever.name}) ==")
    print("per fold: " + "  ".join(f"{k}={np.mean([r[k] for r in rows]):.4f}±{np.std([r[k] for r in rows]):.4f}"
                                   for k in keys))
    for variant, (ys, ps) in pooled.items():
        y, p = np.concatenate(ys), np.concatenate(ps)
        intervals = bootstrap_intervals(y, p, data.labels, data.positive_label, 0.5 if binary else None)
        print(f"pooled out-of-fold, {variant} (n={len(y)}): " + format_intervals(intervals, shown(args.dataset, binary)))
    return 0


PLAIN = "plain"


def _fold_extras(args, data, idx, image_size: int):
    """Arrays saved beside a new fold model's logits: robustness read-outs, and with --ood-other
    the pooled features benchmarks/out_of_scope.py --folds needs."""
    from benchmarks.stain_shift import robustness_arrays

    robustness = robustness_arrays(data, idx)
    if not args.ood_other:
        return robustness
    from benchmarks.out_of_scope import fold_feature_arrays, probe_images

    features = fold_feature_arrays(data, idx, probe_images(args.data, args.ood_other, image_size, 500, 50))
    return lambda model: {**robustness(model), **features(model)}


def _variants(z) -> dict[str, tuple]:
    """(validation logits, test logits) per read-out saved for a fold: plain, TTA, each stain shift
    (a shift's temperature and threshold come from the un-stained validation split)."""
    from benchmarks.stain_shift import SHIFTS

    out = {PLAIN: (z["val_logits"], z["test_logits"])}
    if "tta_val_logits" in z:
        out["tta (8 views)"] = (z["tta_val_logits"], z["tta_test_logits"])
    for name in SHIFTS:
        if f"shift_{name}_test_logits" in z:
            out[f"restained {name}"] = (z["val_logits"], z[f"shift_{name}_test_logits"])
    return out


def _centred_on_threshold(p, data, threshold):
    """Binary: map P(positive) monotonically so that each fold's own validation threshold becomes 0.5
    (pooled decisions are each fold's decisions; pooled AUC mixes the folds' shifted scores)."""
    if data.positive_label is None or threshold is None:
        return p
    pos = data.labels.index(data.positive_label)
    out = p.copy()
    out[:, pos] = 0.5 + (p[:, pos] - threshold) / 2
    out[:, 1 - pos] = 1 - out[:, pos]
    return out


def served_figures(bundle, images, y, tta: bool) -> tuple[dict, dict]:
    """(metrics, 95 % bootstrap intervals) of the served bundle on (test) images, plain or with TTA
    and the bundle's TTA threshold, exactly as the gate, serving and screening compute them."""
    from contracts.tta import decision_threshold
    from training.evaluate import compute_metrics
    from training.intervals import bootstrap_intervals
    from training.tta import served_probabilities

    probs = served_probabilities(bundle.runner(), images, tta)
    meta = bundle.meta
    threshold = decision_threshold(meta, tta)
    return (compute_metrics(y, probs, meta["labels"], meta.get("positive_label"), threshold),
            bootstrap_intervals(y, probs, meta["labels"], meta.get("positive_label"), threshold))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a dataset spec name (pipeline/specs/<name>.toml)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding <dataset>/<class folder>/images")
    parser.add_argument("--home", type=Path, default=None, help="reuse this HEMAFLOW_HOME (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (with --home)")
    parser.add_argument("--direct", action="store_true", help="no stack: train in-process on the same splits")
    parser.add_argument("--folds", type=int, default=0, help="k-fold estimate over content-hash folds (no stack)")
    parser.add_argument("--ood-other", default="", help="with --folds: also save each new fold model's pooled "
                        "features and those of this other dataset's images (out_of_scope.py --folds)")
    from benchmarks.levers import LEVERS

    parser.add_argument("--lever", default="baseline", choices=sorted(LEVERS),
                        help="with --direct/--folds: a benchmarks/levers.py lever on top of the shipped defaults")
    args = parser.parse_args(argv)
    if args.lever != "baseline" and not (args.direct or args.folds):
        parser.error("--lever needs --direct or --folds (the full stack always trains the shipped defaults)")
    source = args.data / args.dataset
    if not source.is_dir():
        print(f"no data at {source}", file=sys.stderr)
        return 2
    if args.direct or args.folds:
        os.environ["HEMAFLOW_ENV_FILE"] = ""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return direct(args)

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
        images, test_y = load_split_arrays(folder, read_local_meta(folder), "test")
        bundle = download_bundle(mlflow_client(settings), trained["run_id"], settings)
        behaviour = behaviour_checks(bundle, images)
        from contracts.tta import on_by_default, uses_tta
        from training.intervals import format_intervals

        figures = {tta: served_figures(bundle, images, test_y, tta) for tta in (False, True)}
        served = uses_tta(settings.inference_tta, on_by_default(bundle.meta))
        test = figures[served][0]
        total_s = time.perf_counter() - started

        print()
        print(f"== {args.dataset} accuracy benchmark (shipped defaults, test split, served TFLite model) ==")
        print(f"images: uploaded {uploaded.get('uploaded')} skipped {uploaded.get('skipped')}; "
              f"test images {test['n']}")
        for tta, (metrics, ci) in figures.items():
            name = "8-view TTA, its threshold" if tta else "plain"
            print(f"test, {name}{' (as served)' if tta == served else ''}: "
                  + "  ".join(f"{k}={metrics[k]:.4f}" for k in shown(args.dataset, bool(metrics.get("threshold")))
                              if metrics.get(k) is not None))
            print(f"  95% bootstrap intervals: {format_intervals(ci, tuple(ci))}; "
                  f"threshold {metrics.get('threshold')}; confusion {metrics['confusion_matrix']}")
        gate_test = gate["comparison"]["candidate"]["metrics"]
        assert gate_test["confusion_matrix"] == test["confusion_matrix"], "the gate evaluated another way"
        print(f"calibration: {json.dumps(bundle.meta.get('calibration'))}  stop_reason: {trained.get('stop_reason')}")
        print(f"served model: {json.dumps(bundle.meta.get('quantization'))}")
        for k, target in TARGETS.get(args.dataset, {}).items():
            print(f"target {k} >= {target}: {'MET' if test[k] >= target else 'NOT MET'} ({test[k]:.4f})")
        print(f"confusion matrices: rows true, cols predicted; labels {bundle.meta['labels']}")
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
