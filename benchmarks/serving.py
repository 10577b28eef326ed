"""Benchmark: HemaFlow serving vs `mlflow models serve` of the same registered model.

By default it starts a private local stack (SeaweedFS + MLflow, free ports, temp folder),
runs the pipeline on ../shared/data/leukemia, trains a small candidate with the training
code and promotes it to @champion. `--tracking-uri URI` skips all that and uses the
@champion of an existing registry. Then, in the same run:

  * HemaFlow serving (`python -m serving`, in .venv-serving when it exists) following @champion;
  * `mlflow models serve -m models:/<name>@champion --env-manager local`;

each is cold-started (launch -> ready), warmed up, and driven over loopback by a separate
load-generator process (asyncio, keep-alive, raw HTTP/1.1) with the real JPEGs: sequential,
then concurrency 8 and 32, each with a bounded request count. HemaFlow gets the JPEG bytes
(it decodes and preprocesses them itself); MLflow gets the already preprocessed float tensor
as JSON (it cannot decode images), which favours MLflow. Prints p50/p99 latency, requests/s,
errors, cold start and peak RSS for both, the ratios, and the serving venv's installed size.

    .venv/bin/python benchmarks/serving.py [--data ../shared/data/leukemia] [--tracking-uri URI --dataset leukemia]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = [("sequential", 1, 300), ("c=8", 8, 800), ("c=32", 32, 1600)]
MLFLOW_PHASES = [("sequential", 1, 100), ("c=8", 8, 200), ("c=32", 32, 320)]
PHASE_TIME_CAP_S = 90.0
TARGETS = {"p50_ms": 10.0, "throughput_ratio_c32": 5.0, "cold_start_s": 3.0, "rss_mb": 300.0, "venv_mb": 250.0}


# --------------------------------------------------------------------------- load generator
def _multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "hemaflowbench" + secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _requests(kind: str, images: list[Path], size: int) -> list[bytes]:
    out = []
    for path in images:
        data = path.read_bytes()
        if kind == "hemaflow":
            body, ctype = _multipart(data, path.name)
            target = "/v1/predict"
        else:
            from contracts.imaging import prepare_image

            arr = prepare_image(data, size).astype("float32")[None]
            body = json.dumps({"inputs": arr.tolist()}).encode()
            ctype, target = "application/json", "/invocations"
        head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
        out.append(head + body)
    return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            n = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(n + 2)
            if n == 0:
                break
    return status


async def _drive(port: int, reqs: list[bytes], concurrency: int, count: int, cap_s: float) -> dict:
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + cap_s

    async def worker() -> None:
        nonlocal issued, errors
        reader = writer = None
        while issued < count and time.perf_counter() < deadline:
            req = reqs[issued % len(reqs)]
            issued += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.perf_counter()
                writer.write(req)
                await writer.drain()
                status = await asyncio.wait_for(_read_response(reader), 60)
                latencies.append((time.perf_counter() - t0) * 1000.0)
                if status != 200:
                    errors += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": issued, "errors": errors, "wall_s": round(wall, 3),
        "rps": round(n / wall, 1) if wall else 0.0,
        "p50_ms": round(statistics.median(latencies), 2) if n else None,
        "p99_ms": round(latencies[min(n - 1, int(0.99 * n))], 2) if n else None,
    }


def load_main(args: argparse.Namespace) -> None:
    """Entry of the separate load-generator process: prints one JSON line per phase."""
    images = [Path(p) for p in json.loads(Path(args.images_file).read_text())]
    reqs = _requests(args.kind, images, args.size)
    phases = json.loads(args.phases)
    asyncio.run(_drive(args.port, reqs, 1, 10, 60))  # warm-up (not reported)
    for name, concurrency, count in phases:
        result = asyncio.run(_drive(args.port, reqs, concurrency, count, PHASE_TIME_CAP_S))
        print(json.dumps({"phase": name, "concurrency": concurrency, **result}), flush=True)


# --------------------------------------------------------------------------- servers
def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback
            return r.status == 200
    except Exception:
        return False


def _start(cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, float]:
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=str(REPO), start_new_session=True)
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited:\n{log.read_text(errors='replace')[-3000:]}")
        if _get_ok(ready_url):
            return proc, time.perf_counter() - t0
        time.sleep(0.02)
    _stop(proc)
    raise RuntimeError(f"{cmd[:3]} not ready after {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process and all its descendants, in MB."""
    pids, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        for c in map(int, children):
            if c not in pids:
                pids.add(c)
                frontier.append(c)
    cur = peak = 0
    for p in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        cur += int(fields.get("VmRSS", "0 kB").split()[0])
        peak += int(fields.get("VmHWM", "0 kB").split()[0])
    return round(cur / 1024, 1), round(peak / 1024, 1)


def _drive_server(kind: str, port: int, pid: int, images_file: Path, size: int, phases) -> dict:
    """Run the phases from a separate load-generator process; print each phase as it is measured."""
    cmd = [sys.executable, __file__, "--load", "--kind", kind, "--port", str(port), "--images-file", str(images_file),
           "--size", str(size), "--phases", json.dumps(phases)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    results = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        results[row["phase"]] = row
        print(f"  {kind} {row['phase']}: {row['rps']} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
              f"errors {row['errors']}/{row['requests']}", flush=True)
    cur, peak = _tree_rss_mb(pid)
    return {"phases": results, "rss_mb": cur, "peak_rss_mb": peak}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "leukemia"))
    parser.add_argument("--dataset", default="leukemia")
    parser.add_argument("--tracking-uri", help="use this registry's @champion instead of training one")
    parser.add_argument("--bundle", help="serve this local bundle folder (no stack, no training; "
                        "the mlflow comparison then needs --tracking-uri)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-budget-s", type=float, default=240.0)
    parser.add_argument("--images", type=int, default=64, help="distinct JPEGs cycled by the load generator")
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--save-bundle", help="also copy the champion's serving bundle to this folder (for demos)")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--images-file", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--phases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return 0

    data = Path(args.data)
    jpegs = sorted(data.rglob("*.jpg")) if data.is_dir() else []
    if not jpegs:
        print(f"no JPEGs under {data}: this benchmark needs ../shared/data/leukemia", file=sys.stderr)
        return 2
    random.Random(0).shuffle(jpegs)
    work = Path(tempfile.mkdtemp(prefix="hemaflow-bench-serving-"))
    images_file = work / "images.json"
    images_file.write_text(json.dumps([str(p) for p in jpegs[: args.images]]))

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
    procs: list[subprocess.Popen] = []
    try:
        if own_stack:
            trained = _train_champion(data, args.dataset, args.epochs, args.train_budget_s)
            if args.save_bundle:
                from serving.registry import basic_auth, download_bundle

                out = Path(args.save_bundle)
                s = get_settings()
                reader = basic_auth(s.serving_mlflow_username, s.serving_mlflow_password.get_secret_value())
                for rel, blob in download_bundle(s.mlflow_tracking_uri, trained["run_id"], auth=reader).items():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).write_bytes(blob)
        s = get_settings()
        model_name = s.model_name(args.dataset)
        report: dict[str, dict] = {}

        serving_py = REPO / ".venv-serving" / "bin" / "python"
        python = str(serving_py) if serving_py.exists() else sys.executable
        port = free_port()
        env = {"DATASET": args.dataset, "SERVING_PORT": str(port), "SERVING_POLL_INTERVAL_S": "0",
               "PYTHONPATH": str(REPO), "HEMAFLOW_ENV_FILE": ""}
        if args.bundle:
            env["SERVING_BUNDLE_PATH"] = str(Path(args.bundle).resolve())
        proc, cold = _start([python, "-m", "serving", "--port", str(port), "--log-level", "warning"], env,
                            f"http://127.0.0.1:{port}/readyz", work / "hemaflow.log")
        procs.append(proc)
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model").read())  # noqa: S310
        size = int(info["image_size"])
        print(f"HemaFlow serving: {info['model']['name']} version {info['model']['version']}, input {size}px, "
              f"ready in {cold:.2f}s ({Path(python).parent.parent.name})", flush=True)
        report["hemaflow"] = {"cold_start_s": round(cold, 2),
                              **_drive_server("hemaflow", port, proc.pid, images_file, size, PHASES)}
        _stop(proc)
        # Same server with micro-batching on: does batching concurrent requests help on this machine?
        port = free_port()
        proc, cold = _start([python, "-m", "serving", "--port", str(port), "--log-level", "warning"],
                            {**env, "SERVING_PORT": str(port), "SERVING_MICRO_BATCH": "8"},
                            f"http://127.0.0.1:{port}/readyz", work / "hemaflow-batch8.log")
        procs.append(proc)
        report["hemaflow-batch8"] = {"cold_start_s": round(cold, 2),
                                      **_drive_server("hemaflow", port, proc.pid, images_file, size, PHASES)}
        _stop(proc)

        if not args.skip_mlflow and (own_stack or args.tracking_uri):
            mport = free_port()
            mlflow_bin = str(Path(sys.executable).parent / "mlflow")
            # `mlflow models serve` execs `uvicorn` from PATH: put this venv's bin first.
            menv = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint_url,
                    "AWS_ACCESS_KEY_ID": s.aws_access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value()}
            mproc, mcold = _start([mlflow_bin, "models", "serve", "-m", f"models:/{model_name}@champion",
                                   "--env-manager", "local", "--host", "127.0.0.1", "-p", str(mport)], menv,
                                  f"http://127.0.0.1:{mport}/ping", work / "mlflow-serve.log", timeout_s=300)
            procs.append(mproc)
            print(f"mlflow models serve: ready in {mcold:.2f}s", flush=True)
            report["mlflow"] = {"cold_start_s": round(mcold, 2),
                                **_drive_server("mlflow", mport, mproc.pid, images_file, size, MLFLOW_PHASES)}
            _stop(mproc)
        _print(report, serving_py)
    finally:
        for p in procs:
            _stop(p)
        if own_stack:
            stack.down(get_settings())
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(report: dict, serving_py: Path) -> None:
    print("\nserver            phase       conc  requests errors   req/s    p50 ms   p99 ms")
    for server, r in report.items():
        for name, ph in r["phases"].items():
            print(f"{server:<17} {name:<11} {ph['concurrency']:>4} {ph['requests']:>9} {ph['errors']:>6} "
                  f"{ph['rps']:>7} {ph['p50_ms']:>9} {ph['p99_ms']:>8}")
    for server, r in report.items():
        print(f"{server:<17} cold start to ready {r['cold_start_s']:.2f} s, RSS {r['rss_mb']} MB "
              f"(peak {r['peak_rss_mb']} MB, process tree)")
    h = report["hemaflow"]
    if "hemaflow-batch8" in report:
        b8 = report["hemaflow-batch8"]["phases"]
        for name in ("c=8", "c=32"):
            print(f"micro-batching (SERVING_MICRO_BATCH=8) at {name}: "
                  f"{b8[name]['rps'] / max(h['phases'][name]['rps'], 1e-9):.2f}x the throughput of the default (off)")
    venv = serving_py.parent.parent
    venv_mb = _dir_mb(venv) if venv.exists() else None
    checks = [
        ("p50 single image (sequential)", h["phases"]["sequential"]["p50_ms"], "ms", "<=", TARGETS["p50_ms"]),
        ("cold start to ready", h["cold_start_s"], "s", "<=", TARGETS["cold_start_s"]),
        ("peak RSS", h["peak_rss_mb"], "MB", "<=", TARGETS["rss_mb"]),
    ]
    if venv_mb is not None:
        checks.append(("serving venv installed size", venv_mb, "MB", "<=", TARGETS["venv_mb"]))
    if "mlflow" in report:
        m = report["mlflow"]
        for name in ("sequential", "c=8", "c=32"):
            ratio = h["phases"][name]["rps"] / max(m["phases"][name]["rps"], 1e-9)
            p50 = m["phases"][name]["p50_ms"] / max(h["phases"][name]["p50_ms"], 1e-9)
            print(f"ratio {name:<10}: throughput {ratio:.1f}x, p50 {p50:.1f}x lower (HemaFlow vs mlflow models serve)")
        c32 = h["phases"]["c=32"]["rps"] / max(m["phases"]["c=32"]["rps"], 1e-9)
        checks.append(("throughput vs mlflow at c=32", round(c32, 1), "x", ">=", TARGETS["throughput_ratio_c32"]))
        print(f"cold start ratio: {m['cold_start_s'] / h['cold_start_s']:.1f}x faster; "
              f"RSS ratio: {m['peak_rss_mb'] / max(h['peak_rss_mb'], 1e-9):.1f}x smaller")
    print("\ntargets:")
    for what, value, unit, op, target in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value} {unit} ({op} {target})")


if __name__ == "__main__":
    sys.exit(main())
