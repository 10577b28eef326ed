"""Levers: what each training change gives on VALIDATION (never on the test split).

    nice -n 10 .venv/bin/python benchmarks/levers.py --dataset leukemia --lever baseline input128 ...
    .venv/bin/python benchmarks/levers.py --dataset leukemia --determinism [--lever fused]   # two short runs, same figures?

Reads ../shared/data/<dataset> directly (no stack), decodes with `prepare_image`, splits by
content hash as the pipeline does, trains each lever with `training.experiment` and appends
one JSON line per lever to --out (default ~/.cache/hemaflow-levers/results.jsonl), then prints
a table. Levers change one thing against the shipped defaults (`Settings`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.averaging import EMA_MOMENTUM  # noqa: E402  (light: no TensorFlow import)

CACHE = Path.home() / ".cache" / "hemaflow-levers"
# name -> changes to the shipped defaults (crop changes the decoded images, not the Lever).
LEVERS = {
    "baseline": {},
    "input128": {"input_size": 128},
    "input160": {"input_size": 160},
    "width20": {"width": 20},  # ~1.45x the fit time of width 16 through the pipeline
    "width20_seed2": {"width": 20, "seed": 1338},  # with width20: two seeds average no better than 16's
    "width24": {"width": 24},
    "width12": {"width": 12},  # ~0.56x the multiply-adds of width 16: two of them for an ensemble
    "width12_seed2": {"width": 12, "seed": 1338},
    "seed2": {"seed": 1338},  # the shipped network, another initialisation and augmentation stream
    "seed3": {"seed": 1339},
    "seed4": {"seed": 1340},
    "seed5": {"seed": 1341},
    "subtypes": {"subtypes": True},  # the class folders as classes, summed into labels (one seed: exploratory)
    "adamw": {"weight_decay": 0.05},  # AdamW at the usual ConvNet value (0.05 x rate each step): not adopted
    "adamw_seed2": {"weight_decay": 0.05, "seed": 1338},
    "epochs10": {"epochs": 10},  # two of these fit the budget where two 14-epoch networks do not
    "epochs10_seed2": {"epochs": 10, "seed": 1338},
    "epochs10_seed3": {"epochs": 10, "seed": 1339},  # with seeds 4 and 5: ten pairs for the quantile rule
    "epochs10_seed4": {"epochs": 10, "seed": 1340},
    "epochs10_seed5": {"epochs": 10, "seed": 1341},
    # An exponential moving average of the weights validated and served (training.averaging): not pursued (README)
    "ema": {"ema_momentum": EMA_MOMENTUM},
    "ema_seed2": {"ema_momentum": EMA_MOMENTUM, "seed": 1338},
    "ema_seed3": {"ema_momentum": EMA_MOMENTUM, "seed": 1339},
    "ema_seed4": {"ema_momentum": EMA_MOMENTUM, "seed": 1340},
    "ema_seed5": {"ema_momentum": EMA_MOMENTUM, "seed": 1341},
    # BatchNorm trained with TensorFlow's fused kernel (training.fused_batchnorm): the same function, 0.69x
    # the step time here (train_step_speed.py); five seeds so the single networks and the ten pairs compare with the plain kernel's
    "fused": {"fused_batchnorm": True},
    "fused_seed2": {"fused_batchnorm": True, "seed": 1338},
    "fused_seed3": {"fused_batchnorm": True, "seed": 1339},
    "fused_seed4": {"fused_batchnorm": True, "seed": 1340},
    "fused_seed5": {"fused_batchnorm": True, "seed": 1341},
    "depth6": {"depth": 6},
    "separable": {"conv": "separable"},
    "separable_w32": {"conv": "separable", "width": 32},  # ~ the multiply-adds of width 16 with full convs
    "colour2x": {"colour_strength": 2.0},
    "colour0": {"colour_strength": 0.0},
    "crop_fit": {"crop": "fit"},
    "crop_center": {"crop": "center_crop"},
    "lr1e-3": {"learning_rate": 1e-3},
    "plateau": {"lr_schedule": "plateau"},
    "input128_plateau": {"input_size": 128, "lr_schedule": "plateau"},
    "epochs20": {"epochs": 20},
    "bn99": {"bn_momentum": 0.99},
    "bn50": {"bn_momentum": 0.5},
    "precise_bn": {"precise_bn": "after_fit"},
    "precise_bn_each_epoch": {"precise_bn": "each_epoch"},
    "stain_none": {"stain_normalisation": "none"},
    "stain_per_image": {"stain_normalisation": "per_image"},
    "stain_macenko": {"stain_normalisation": "macenko"},  # training.stain: a lever, not exportable yet
}
COLUMNS = ("lever", "epochs_run", "stop_reason", "fit_s", "val_loss", "val_accuracy", "val_macro_f1",
           "val_roc_auc", "val_sens_at_spec97", "val_ece", "temperature")


def print_table(rows: list[dict]) -> None:
    print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--lever", nargs="*", default=["baseline"], choices=sorted(LEVERS))
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (default: EPOCHS setting)")
    parser.add_argument("--determinism", action="store_true", help="train the (first) lever 2 epochs twice and compare")
    parser.add_argument("--out", type=Path, default=CACHE / "results.jsonl")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["HEMAFLOW_ENV_FILE"] = ""

    from contracts.dataset_spec import load_spec, training_settings
    from contracts.settings import get_settings
    from training import experiment as ex

    s = training_settings(get_settings(), args.dataset)  # the spec's [training] table, as training applies it
    spec = load_spec(args.dataset)
    rows = []
    for name in (args.lever[:1] * 2 if args.determinism else args.lever):
        changes = dict(LEVERS[name])
        crop = changes.pop("crop", getattr(spec, "crop", "center_crop"))
        data = ex.load_folder(args.data / args.dataset, spec, s.image_size, crop, CACHE)
        idx = ex.pipeline_splits(data, s)
        epochs = 2 if args.determinism else (args.epochs or s.epochs)
        lever = ex.lever_from_settings(s, name=name, **{"epochs": epochs, **changes})
        saved = None if args.determinism else CACHE / f"logits-{ex.lever_key(args.dataset, crop, lever)}.npz"
        row = {"dataset": args.dataset, **ex.fit_and_score(data, idx, lever, s.train_time_budget_s,
                                                           save_logits=saved)}
        row["epoch_cap"] = lever.epochs
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.determinism:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    print_table(rows)
    if args.determinism:
        same = all(rows[0][k] == rows[1][k] for k in ("val_loss", "val_accuracy", "val_roc_auc", "temperature"))
        print(f"determinism: two runs {'IDENTICAL' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
