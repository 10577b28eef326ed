"""Benchmark: HemaFlow serving vs today's HemaFlow, `mlflow models serve` and a plain Flask app, one run.

By default it starts a private local stack (SeaweedFS + MLflow, free ports, temp folder),
runs the pipeline on ../shared/data/leukemia, trains a small candidate with the training
code and promotes it to @champion. `--tracking-uri URI` skips all that and uses the
@champion of an existing registry; `--bundle DIR` serves a local bundle (no MLflow comparison).
Then, in the same run, every server is cold-started and driven over loopback by a separate
load-generator process (asyncio, keep-alive, raw HTTP/1.1) with real JPEGs: sequential, then
concurrency 8 and 32, `--repeats` times, interleaved across servers (the machine's load drifts),
reporting medians:

  * `hemaflow`: this tree's `python -m serving` with the shipped defaults;
  * `hemaflow-workers2`: the same with SERVING_WORKERS=2 (one inference thread each);
  * `hemaflow-float32`: this tree serving the champion's float32 twin (`float32_twin`: the same
    Keras weights exported without MODEL_QUANTIZATION, signed with the stack's key), when the
    champion is quantized: what the serving code alone gained;
  * `hemaflow-before`: the serving code of `--baseline-ref` (the commit before issue 14),
    checked out with `git archive` into a temp folder and run with the same interpreter, on the
    float32 twin (today's app with today's model);
  * `flask`: the shape of a typical hand-made app (serving_baselines.FLASK_APP), on the float32 twin: one Flask route,
    Pillow decode + resize, one LiteRT interpreter behind a lock, jsonify, Flask's development
    server in one process;
  * `mlflow`: `mlflow models serve -m models:/<name>@champion --env-manager local`, once (it is
    slow); it gets the already preprocessed float tensor as JSON (it cannot decode images).

HemaFlow and Flask receive the JPEG bytes. A 4000x4000 JPEG (an upscaled dataset image) is also
sent sequentially to every image server. Prints p50/p99 latency, requests/s, errors, cold start,
RSS per process, the ratios and the targets.

    .venv/bin/python benchmarks/serving.py [--data ../shared/data/leukemia] [--repeats 3]
        [--tracking-uri URI --dataset leukemia | --bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.serving_baselines import (  # noqa: E402 - after the sys.path line (run as a file)
    DEFAULT_BASELINE_REF, FLASK_APP, FLASK_PHASES, MLFLOW_PHASES, Server, checkout_baseline, float32_twin,
    stop_server)
from contracts.bundle import QUANTIZATION_NONE, quantization_of  # noqa: E402
from benchmarks.serving_load import drive_phases  # noqa: E402

PHASES = [("sequential", 1, 300), ("c=8", 8, 800), ("c=32", 32, 1600)]
LARGE_PHASES = [("4000px sequential", 1, 20)]
LARGE_SIDE = 4000
TARGETS = {"p50_ms": 3.0, "large_p50_ms": 40.0, "vs_flask_c32": 10.0, "vs_before_c32": 1.6, "vs_mlflow_c32": 5.0,
           "cold_start_s": 3.0, "rss_mb": 150.0, "venv_mb": 250.0}


def _dir_mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / 1e6, 1)


# --------------------------------------------------------------------------- model
def _train_champion(data: Path, dataset: str, epochs: int, budget_s: float) -> dict:
    from pipeline.run import run_pipeline
    from contracts.settings import get_settings
    from pipeline.upload import upload_tree
    from training.gate import promote_if_better
    from training.train import train_candidate

    s = get_settings()
    t0 = time.perf_counter()
    upload_tree(data, dataset, s)
    version = run_pipeline(dataset, s)["preprocess"]["dataset_version"]
    print(f"  pipeline: dataset_version {version} in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    train_s = s.model_copy(update={"epochs": epochs, "train_time_budget_s": budget_s})
    trained = train_candidate(dataset, version, train_s)
    # This benchmark measures serving speed: the gate floors are not the point here.
    gate_s = s.model_copy(update={"gate_min_balanced_accuracy": 0.0, "gate_min_sensitivity": 0.0,
                                  "gate_min_accuracy": 0.0})
    gate = promote_if_better(dataset, trained["model_version"], gate_s)
    metrics = trained.get("metrics") or {}
    print(f"  trained version {trained['model_version']} in {time.perf_counter() - t0:.0f}s "
          f"(test balanced_accuracy {metrics.get('balanced_accuracy', float('nan')):.3f}); "
          f"champion: {gate['decision']['passed']}", flush=True)
    return trained


def _large_jpeg(source: Path, out: Path) -> Path:
    from PIL import Image

    with Image.open(source) as img:
        img.convert("RGB").resize((LARGE_SIDE, LARGE_SIDE), Image.Resampling.BICUBIC).save(out, quality=90)
    return out

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "leukemia"))
    parser.add_argument("--dataset", default="leukemia")
    parser.add_argument("--tracking-uri", help="use this registry's @champion instead of training one")
    parser.add_argument("--bundle", help="serve this local bundle folder (no stack, no training, no mlflow)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-budget-s", type=float, default=240.0)
    parser.add_argument("--images", type=int, default=200, help="distinct JPEGs cycled by the load generator")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every phase per server (medians reported)")
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE_REF, help="git ref of 'today's HemaFlow'")
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--skip-flask", action="store_true")
    parser.add_argument("--save-bundle", help="also copy the champion's serving bundle to this folder (for demos)")
    args = parser.parse_args()

    data = Path(args.data)
    jpegs = sorted(data.rglob("*.jpg")) if data.is_dir() else []
    if not jpegs:
        print(f"no JPEGs under {data}: this benchmark needs ../shared/data/leukemia", file=sys.stderr)
        return 2
    random.Random(0).shuffle(jpegs)
    work = Path(tempfile.mkdtemp(prefix="hemaflow-bench-serving-"))
    images_file = work / "images.json"
    images_file.write_text(json.dumps([str(p) for p in jpegs[: args.images]]))
    large_file = work / "large.json"
    large_file.write_text(json.dumps([str(_large_jpeg(jpegs[0], work / "large.jpg"))]))

    from ops import stack
    from contracts.settings import get_settings
    from ops.stack import free_port, private_stack_env

    own_stack = args.tracking_uri is None and args.bundle is None
    if own_stack:
        os.environ.update(private_stack_env(work / "home", bucket="hemaflow-bench"))
        print("starting a private stack and training a champion on", data, flush=True)
        stack.up(get_settings())
    elif args.tracking_uri:
        os.environ.update({"MLFLOW_TRACKING_URI": args.tracking_uri, "HEMAFLOW_ENV_FILE": ""})
    servers: list[Server] = []
    try:
        bundle = Path(args.bundle).resolve() if args.bundle else work / "bundle"
        s = get_settings()
        if not args.bundle:
            from serving.registry import basic_auth, download_bundle, resolve_champion

            if own_stack:
                _train_champion(data, args.dataset, args.epochs, args.train_budget_s)
                s = get_settings()
            reader = basic_auth(s.serving_mlflow_username, s.serving_mlflow_password.get_secret_value())
            ref = resolve_champion(s.mlflow_tracking_uri, s.model_name(args.dataset), auth=reader)
            for rel, blob in download_bundle(s.mlflow_tracking_uri, ref.run_id, auth=reader).items():
                for out in [bundle] + ([Path(args.save_bundle)] if args.save_bundle else []):
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).write_bytes(blob)
        meta = json.loads((bundle / "bundle.json").read_text())
        size = int(meta["image_size"])
        model_name = s.model_name(args.dataset)
        # Today's app served today's (float32) model: the baselines get the champion's float32 twin.
        float_bundle = bundle
        if not args.bundle and s.bundle_signing_key.get_secret_value():
            float_bundle = float32_twin(bundle, work / "bundle-float32", s)
        elif quantization_of(meta) != QUANTIZATION_NONE:
            print("no BUNDLE_SIGNING_KEY here: the baselines serve the shipped quantized model too", flush=True)

        serving_py = REPO / ".venv-serving" / "bin" / "python"
        python = str(serving_py) if serving_py.exists() else sys.executable
        base_env = {"DATASET": args.dataset, "SERVING_POLL_INTERVAL_S": "0", "HEMAFLOW_ENV_FILE": ""}
        if args.bundle:
            base_env["SERVING_BUNDLE_PATH"] = str(bundle)

        def hemaflow(name: str, root: Path, **env: str) -> Server:
            port = free_port()
            return Server(name, "hemaflow", [python, "-m", "serving", "--port", str(port), "--log-level", "warning"],
                          {**base_env, "PYTHONPATH": str(root), "SERVING_PORT": str(port), **env}, "/readyz", port,
                          PHASES, large=True, cwd=root)

        servers.append(hemaflow("hemaflow", REPO))
        servers.append(hemaflow("hemaflow-workers2", REPO, SERVING_WORKERS="2"))
        float_env = {} if float_bundle == bundle else {"SERVING_BUNDLE_PATH": str(float_bundle)}
        if float_env:
            servers.append(hemaflow("hemaflow-float32", REPO, **float_env))
        before = checkout_baseline(args.baseline_ref, work / "before")
        if before is not None:
            servers.append(hemaflow("hemaflow-before", before, **float_env))
        if not args.skip_flask:
            app_file = work / "flask_app.py"
            app_file.write_text(FLASK_APP)
            port = free_port()
            servers.append(Server("flask", "flask", [sys.executable, str(app_file), str(float_bundle / "model.tflite"),
                                                     str(port), str(size)], {}, "/ping", port, FLASK_PHASES, large=True))
        # Interleaved repeats: each server runs its phases once per round, so drifting load from
        # other work on the machine spreads over all of them. Idle servers wait, started.
        for server in servers:
            server.start(work)
        for rnd in range(1, args.repeats + 1):
            for server in servers:
                print(f"  round {rnd}/{args.repeats} {server.name}", flush=True)
                server.runs.append(drive_phases(server.kind, server.port, server.proc.pid, images_file, size, server.phases))
                if server.large:
                    server.large_runs.append(drive_phases(server.kind, server.port, server.proc.pid, large_file, size, LARGE_PHASES))
        report = {server.name: server.summary() for server in servers}
        for server in servers:
            stop_server(server.proc)

        if not args.skip_mlflow and not args.bundle:
            mport = free_port()
            mlflow_bin = str(Path(sys.executable).parent / "mlflow")
            # `mlflow models serve` execs `uvicorn` from PATH: put this venv's bin first.
            menv = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint_url,
                    "AWS_ACCESS_KEY_ID": s.aws_access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value()}
            mlflow = Server("mlflow", "mlflow", [mlflow_bin, "models", "serve", "-m", f"models:/{model_name}@champion",
                                                 "--env-manager", "local", "--host", "127.0.0.1", "-p", str(mport)],
                            menv, "/ping", mport, MLFLOW_PHASES, large=False)
            servers.append(mlflow)
            mlflow.start(work)
            print("  mlflow (one round: it is slow)", flush=True)
            mlflow.runs.append(drive_phases("mlflow", mport, mlflow.proc.pid, images_file, size, MLFLOW_PHASES))
            report["mlflow"] = mlflow.summary()
            stop_server(mlflow.proc)
        _print(report, serving_py, args.baseline_ref)
        (work.parent / "hemaflow-bench-serving-last.json").write_text(json.dumps(report, indent=1))
    finally:
        for server in servers:
            if server.proc is not None:
                stop_server(server.proc)
        if own_stack:
            stack.down(get_settings())
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _ratio(a: float, b: float) -> float:
    return round(a / max(b, 1e-9), 2)


def _print(report: dict, serving_py: Path, baseline_ref: str) -> None:
    print("\nmedians over the repeats; CPU = server CPU time (all its processes) per answered request")
    print("server              phase              conc  requests errors    req/s   p50 ms   p99 ms  CPU ms/req")
    for server, r in report.items():
        for name, ph in {**r["phases"], **r.get("large", {})}.items():
            print(f"{server:<19} {name:<18} {ph['concurrency']:>4} {ph['requests']:>9} {ph['errors']:>6} "
                  f"{ph['rps']:>8} {ph['p50_ms']:>8} {ph['p99_ms']:>8} {ph['cpu_ms_per_req']:>11}")
    for server, r in report.items():
        print(f"{server:<19} cold start to ready {r['cold_start_s']:.2f} s, RSS {r['rss_mb']} MB in "
              f"{r['processes']} process(es), largest peak of one process {r['peak_rss_per_process_mb']} MB")
    h = report["hemaflow"]
    hp = h["phases"]
    print()
    for other, label in (("hemaflow-workers2", "SERVING_WORKERS=2"),
                         ("hemaflow-float32", "this serving code on the float32 twin"),
                         ("hemaflow-before", f"HemaFlow at {baseline_ref}"),
                         ("flask", "Flask + Pillow + LiteRT"), ("mlflow", "mlflow models serve")):
        if other in report:
            op = report[other]["phases"]
            parts = [f"{name} {_ratio(hp[name]['rps'], op[name]['rps'])}x" for name in hp if name in op]
            cpu = [f"{name} {_ratio(op[name]['cpu_ms_per_req'], hp[name]['cpu_ms_per_req'])}x" for name in hp if name in op]
            print(f"HemaFlow (defaults) vs {label}: throughput " + ", ".join(parts)
                  + "; CPU per request " + ", ".join(cpu) + " lower")
    if "hemaflow-workers2" in report and "hemaflow-before" in report:
        w, b = report["hemaflow-workers2"]["phases"], report["hemaflow-before"]["phases"]
        print("SERVING_WORKERS=2 throughput vs HemaFlow at " + baseline_ref + ": "
              + ", ".join(f"{name} {_ratio(w[name]['rps'], b[name]['rps'])}x" for name in w))
    venv = serving_py.parent.parent
    venv_mb = _dir_mb(venv) if venv.exists() else None
    large = h["large"][LARGE_PHASES[0][0]]["p50_ms"]
    checks = [
        ("p50 of one 224 px JPEG (sequential)", hp["sequential"]["p50_ms"], "ms", "<=", TARGETS["p50_ms"]),
        (f"p50 of one {LARGE_SIDE}x{LARGE_SIDE} JPEG (sequential)", large, "ms", "<=", TARGETS["large_p50_ms"]),
        ("cold start to ready", h["cold_start_s"], "s", "<=", TARGETS["cold_start_s"]),
        ("peak RSS of the serving process", h["peak_rss_per_process_mb"], "MB", "<=", TARGETS["rss_mb"]),
    ]
    for other, key in (("flask", "vs_flask_c32"), ("hemaflow-before", "vs_before_c32"), ("mlflow", "vs_mlflow_c32")):
        if other in report:
            ratio = _ratio(hp["c=32"]["rps"], report[other]["phases"]["c=32"]["rps"])
            checks.append((f"throughput at c=32 vs {other}", ratio, "x", ">=", TARGETS[key]))
    if venv_mb is not None:
        checks.append(("serving venv installed size", venv_mb, "MB", "<=", TARGETS["venv_mb"]))
    print("\ntargets (HemaFlow with the shipped defaults):")
    for what, value, unit, op, target in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value} {unit} ({op} {target})")


if __name__ == "__main__":
    sys.exit(main())
