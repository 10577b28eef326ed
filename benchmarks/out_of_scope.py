"""Out-of-scope benchmark: train a model with the shipped defaults on real data, then measure
its bundle's out-of-scope detector and the cost and effect of test-time augmentation.

    .venv/bin/python benchmarks/out_of_scope.py --dataset leukemia --other pbc8 [--home DIR] [--keep]
    .venv/bin/python benchmarks/out_of_scope.py --dataset leukemia --other pbc8 --home DIR --reuse

Private stack as benchmarks/accuracy.py (upload ../shared/data/<dataset>, pipeline, train, gate);
`--reuse` measures the newest registered version of a kept `--home` instead of training again.
Prints: share of refused images of the dataset's TEST split (in scope, never used to fit or set
thresholds), of the other dataset's images (`--other`, up to `--other-limit`, a different
modality), and of generated non-smears (flat, noise, text, photo); the detector's validation
figures; validation accuracy with and without INFERENCE_TTA; and in-process latency p50 of one
image through serving's own path (decode + prepare + interpreter + detector) with and without
TTA. Targets (issue 10): >= 95 % of other-dataset and synthetic images refused, <= 1 % of
in-scope refused.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def refused_share(model, images: np.ndarray, batch: int = 64) -> tuple[float, dict[str, int]]:
    """Share of `images` (prepared, [N,S,S,3]) the loaded model's detector refuses, and reasons."""
    reasons: dict[str, int] = {}
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        _, _, feats = model.predict_outputs(chunk)
        for v in model.detector.check(feats, chunk):
            if not v.in_scope:
                reasons[v.reason] = reasons.get(v.reason, 0) + 1
    return sum(reasons.values()) / max(1, len(images)), reasons


def other_dataset_images(folder: Path, size: int, limit: int, seed: int = 0) -> np.ndarray:
    """Up to `limit` images of another dataset (spread over its classes), prepared like serving does."""
    from contracts.imaging import prepare_image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), size=min(limit, len(files)), replace=False)
    return np.stack([prepare_image(files[i].read_bytes(), size) for i in sorted(chosen)])


def tta_accuracy(model, images: np.ndarray, y: np.ndarray, tta: bool) -> float:
    """Balanced accuracy of the bundle's decision rule on (validation) images, with or without TTA
    (with it, the bundle's TTA threshold, as serving and screening apply it)."""
    from contracts.tta import average, decision_threshold, views
    from training.evaluate import compute_metrics

    probs = []
    for i in range(0, len(images), 16):
        chunk = images[i:i + 16]
        probs.append(average(model.predict_outputs(views(chunk))[0]) if tta else model.predict_outputs(chunk)[0])
    threshold = decision_threshold(model.meta, tta) if model.task == "binary" else None
    metrics = compute_metrics(y, np.concatenate(probs), model.labels, model.positive_label, threshold)
    return float(metrics["balanced_accuracy"])


def latency_p50_ms(model, jpegs: list[bytes], tta: bool, settings, rounds: int = 200) -> float:
    """p50 of one image through serving's path: header checks + decode + prepare + interpreter + detector."""
    from contracts.tta import average, views
    from serving.inference import prepare

    times = []
    for i in range(rounds):
        start = time.perf_counter()
        image = prepare(jpegs[i % len(jpegs)], model.image_size, settings)
        batch = views(image[None]) if tta else image[None]
        probs, _, feats = model.predict_outputs(batch)
        if tta:
            probs = average(probs)
        model.detector.check(feats[:1], image[None])
        model.decide(probs[0])
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def probe_images(data_root: Path, other: str, size: int, other_limit: int, per_kind: int) -> dict[str, np.ndarray]:
    """The out-of-scope probes as prepared images: `other` (another dataset) and each synthetic kind."""
    from contracts.imaging import prepare_image
    from training.ood import non_smear_images

    probes = {"other": other_dataset_images(data_root / other, size, other_limit)}
    for kind, pics in non_smear_images(per_kind, seed=2026).items():
        probes[f"synthetic_{kind}"] = np.stack([prepare_image(p, size) for p in pics])
    return probes


def fold_feature_arrays(data, idx: dict[str, np.ndarray], probes: dict[str, np.ndarray]):
    """`extra_arrays` for training.experiment.fit_and_score: the trained model's pooled features of
    the fold's train/val/test images and of the probes, so the detector can be fitted afterwards."""
    def arrays(model) -> dict[str, np.ndarray]:
        from training.ood import pooled_features

        out = {f"features_{split}": pooled_features(model, data.images[idx[split]]) for split in idx}
        out["train_idx"] = idx["train"]
        out.update({f"features_probe_{name}": pooled_features(model, images) for name, images in probes.items()})
        return out

    return arrays


# The rule before the conformal one (for comparison only): a plain 99.5 % quantile per check.
PLAIN_QUANTILE = 0.995


def fold_refusals(data, idx: dict[str, np.ndarray], z, probes: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per rule (conformal, plain): the shares refused of the fold's test split and of each probe,
    the detector fitted on the fold's train features and thresholds set on its validation split."""
    import dataclasses

    from training.ood import detector_from_arrays

    tr, va = idx["train"], idx["val"]
    conformal, figures = detector_from_arrays(z["features_train"], data.y[tr], data.images[tr],
                                              z["features_val"], data.images[va])
    val_f, val_s = conformal.scores(z["features_val"], data.images[va])
    plain = dataclasses.replace(conformal, feature_threshold=float(np.quantile(val_f, PLAIN_QUANTILE, method="higher")),
                                statistics_threshold=float(np.quantile(val_s, PLAIN_QUANTILE, method="higher")))
    sets = {"test": (z["features_test"], data.images[idx["test"]])}
    sets.update({name: (z[f"features_probe_{name}"], images) for name, images in probes.items()})
    out = {}
    for rule, det in (("conformal", conformal), ("plain99.5", plain)):
        out[rule] = {name: float(np.mean([not v.in_scope for v in det.check(f, x)])) for name, (f, x) in sets.items()}
        out[rule]["test_refused_n"] = int(round(out[rule]["test"] * len(idx["test"])))
    out["figures"] = figures
    return out


def folds_report(args) -> int:
    """--folds K: the detector on each fold model `benchmarks/accuracy.py --folds K --ood-other` saved."""
    from benchmarks.levers import CACHE
    from contracts.dataset_spec import load_spec, training_settings
    from contracts.settings import get_settings
    from training import experiment as ex

    s = training_settings(get_settings(), args.dataset)  # the spec's [training] table, as training applies it
    spec = load_spec(args.dataset)
    data = ex.load_folder(args.data / args.dataset, spec, s.image_size, spec.crop, CACHE)
    lever = ex.lever_from_settings(s)
    probes = probe_images(args.data, args.other, s.image_size, 500, 50)
    totals: dict[str, list[int]] = {}
    for fold in range(args.folds):
        saved = CACHE / f"logits-{ex.lever_key(args.dataset, spec.crop, lever, f'fold{fold}of{args.folds}')}.npz"
        z = np.load(saved) if saved.is_file() else None
        if z is None or "features_train" not in z:
            print(f"fold {fold + 1}/{args.folds}: no saved features (run accuracy.py --folds {args.folds} "
                  f"--ood-other {args.other} first)")
            continue
        idx = ex.fold_splits(data, args.folds, fold, s.split_salt)
        res = fold_refusals(data, idx, z, probes)
        f = res["figures"]
        print(f"fold {fold + 1}/{args.folds} ({int(z['epochs_run'])} epochs, {z['stop_reason']}): validation "
              f"{f['val_images']} images, rank {f['conformal_rank']}, valid {f['conformal_valid']}, "
              f"pass bound {f['pass_bound']:.4f}")
        for rule in ("conformal", "plain99.5"):
            r = res[rule]
            print(f"  {rule:10s} test refused {r['test']:.4f} ({r['test_refused_n']} of {len(idx['test'])})  "
                  + "  ".join(f"{k}={v:.3f}" for k, v in r.items() if k not in ("test", "test_refused_n")))
            tot = totals.setdefault(rule, [0, 0])
            tot[0] += r["test_refused_n"]
            tot[1] += len(idx["test"])
    for rule, (refused, n) in totals.items():
        print(f"pooled in-scope test images refused, {rule}: {refused} of {n} = {refused / max(1, n):.4f} "
              "(target <= 0.01)")
    return 0


def _jpegs(images: np.ndarray, count: int = 32) -> list[bytes]:
    from PIL import Image

    out = []
    for image in images[:count]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _train_or_reuse(args, settings) -> tuple[str, str]:
    """(run_id, dataset_version) of the model to measure."""
    from pipeline.run import run_pipeline
    from pipeline.upload import upload_tree
    from training.gate import promote_if_better
    from training.tracking import mlflow_client
    from training.train import train_candidate

    if args.reuse:
        client = mlflow_client(settings)
        newest = max(client.search_model_versions(f"name='{settings.model_name(args.dataset)}'"),
                     key=lambda v: int(v.version))
        return newest.run_id, newest.tags["dataset_version"]
    upload_tree(args.data / args.dataset, args.dataset, settings)
    version = run_pipeline(args.dataset, settings)["preprocess"]["dataset_version"]
    t0 = time.perf_counter()
    trained = train_candidate(args.dataset, version, settings, on_epoch=lambda e, logs: print(
        f"  epoch {e + 1}: val_loss={float(logs.get('val_loss', 0)):.4f} [{time.perf_counter() - t0:.0f}s]",
        flush=True))
    promote_if_better(args.dataset, trained["model_version"], settings)
    print(f"trained {trained['epochs_run']} epochs in {time.perf_counter() - t0:.0f}s", flush=True)
    return trained["run_id"], version


def measure(args, settings) -> None:
    from contracts.bundle import read_local_bundle
    from contracts.imaging import prepare_image
    from contracts.processed import read_local_meta
    from contracts.signing import parse_public_keys
    from pipeline.storage import fetch_processed
    from serving.bundle import load_bundle
    from training.data import load_split_arrays
    from training.ood import non_smear_images
    from training.gate import download_bundle
    from training.tracking import mlflow_client

    run_id, version = _train_or_reuse(args, settings)
    bundle = download_bundle(mlflow_client(settings), run_id, settings)
    if args.save_bundle:
        import shutil

        shutil.copytree(bundle.folder, args.save_bundle, dirs_exist_ok=True)
    model = load_bundle(read_local_bundle(bundle.folder),
                        trusted_keys=parse_public_keys(settings.bundle_trusted_public_keys))
    if model.detector is None:
        raise SystemExit("this bundle has no out-of-scope detector")
    folder = fetch_processed(args.dataset, version, settings)
    meta = read_local_meta(folder)
    test_x, _ = load_split_arrays(folder, meta, "test")
    val_x, val_y = load_split_arrays(folder, meta, "val")
    size = model.image_size
    test_refused, test_reasons = refused_share(model, test_x)
    other_refused, other_reasons = refused_share(model, other_dataset_images(args.data / args.other, size,
                                                                               args.other_limit))
    synthetic = {kind: refused_share(model, np.stack([prepare_image(p, size) for p in pics]))[0]
                 for kind, pics in non_smear_images(args.synthetic_per_kind, seed=2026).items()}
    print()
    print(f"== out-of-scope benchmark: {args.dataset} model (run {run_id}), detector {model.meta['ood']['method']} ==")
    print(f"validation (from bundle.json): {model.meta['ood']['validation']}")
    print(f"{args.dataset} test split refused: {test_refused:.4f} of {len(test_x)} {test_reasons} (target <= 0.01)")
    print(f"{args.other} images refused: {other_refused:.4f} of {min(args.other_limit, 10**9)} asked "
          f"{other_reasons} (target >= 0.95)")
    print("synthetic refused: " + "  ".join(f"{k}={v:.3f}" for k, v in synthetic.items())
          + f"  all={np.mean(list(synthetic.values())):.4f} (target >= 0.95)")
    plain, tta = tta_accuracy(model, val_x, val_y, False), tta_accuracy(model, val_x, val_y, True)
    print(f"validation balanced accuracy: without TTA {plain:.4f}, with TTA {tta:.4f} ({len(val_y)} images)")
    jpegs = _jpegs(test_x)
    p50, p50_tta = latency_p50_ms(model, jpegs, False, settings), latency_p50_ms(model, jpegs, True, settings)
    print(f"in-process latency p50 (decode {size}px JPEG + prepare + interpreter + detector): "
          f"without TTA {p50:.2f} ms, with TTA {p50_tta:.2f} ms ({p50_tta / p50:.1f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="leukemia")
    parser.add_argument("--other", default="pbc8", help="a dataset of another modality (should be refused)")
    parser.add_argument("--other-limit", type=int, default=1000)
    parser.add_argument("--synthetic-per-kind", type=int, default=50)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--home", type=Path, default=None, help="reuse this HEMAFLOW_HOME (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (with --home)")
    parser.add_argument("--reuse", action="store_true", help="measure the newest registered version (with --home)")
    parser.add_argument("--save-bundle", type=Path, help="copy the measured bundle here")
    parser.add_argument("--folds", type=int, default=0, help="no stack: the detector on the K fold models "
                        "that `benchmarks/accuracy.py --folds K --ood-other OTHER` saved features of")
    args = parser.parse_args(argv)
    for name in (args.dataset, args.other):
        if not (args.data / name).is_dir():
            print(f"no data at {args.data / name}", file=sys.stderr)
            return 2
    os.environ["HEMAFLOW_ENV_FILE"] = ""  # shipped defaults, not a developer's .env
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.folds:
        return folds_report(args)
    tmp = None if args.home else tempfile.TemporaryDirectory(prefix="hemaflow-ood-bench-")
    home = args.home or Path(tmp.name)
    from benchmarks.accuracy import _stack_env

    os.environ.update(_stack_env(home))
    from contracts.settings import get_settings
    from ops import stack

    settings = get_settings()
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    try:
        stack.up(settings)
        measure(args, settings)
    finally:
        if not args.keep:
            stack.down(settings)
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
