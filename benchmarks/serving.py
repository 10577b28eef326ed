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
  * `hemaflow-before`: the serving code of `--baseline-ref` (the commit before issue 14),
    checked out with `git archive` into a temp folder and run with the same interpreter;
  * `flask`: the shape of a typical hand-made app, written below (FLASK_APP): one Flask route,
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
FLASK_PHASES = [("sequential", 1, 150), ("c=8", 8, 300), ("c=32", 32, 600)]
MLFLOW_PHASES = [("sequential", 1, 50), ("c=8", 8, 100), ("c=32", 32, 200)]
LARGE_PHASES = [("4000px sequential", 1, 20)]
LARGE_SIDE = 4000
PHASE_TIME_CAP_S = 45.0
DEFAULT_BASELINE_REF = "e502c04"  # the last commit before issue 14 (serving performance)
TARGETS = {"p50_ms": 3.0, "large_p50_ms": 40.0, "vs_flask_c32": 10.0, "vs_before_c32": 1.6, "vs_mlflow_c32": 5.0,
           "cold_start_s": 3.0, "rss_mb": 150.0, "venv_mb": 250.0}

# The baseline a team would write by hand: one Flask route, decode, resize, invoke, jsonify.
FLASK_APP = """
import sys, threading
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

model_path, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interpreter = Interpreter(model_path=model_path)
input_index = interpreter.get_input_details()[0]["index"]
interpreter.resize_tensor_input(input_index, [1, size, size, 3])
interpreter.allocate_tensors()
probs_index = [d["index"] for d in interpreter.get_output_details() if len(d["shape"]) == 2][0]
lock = threading.Lock()  # the interpreter is not thread-safe; Flask's server is threaded
app = Flask(__name__)


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(request.files["file"].stream).convert("RGB").resize((size, size))
    batch = np.asarray(image, dtype=np.float32)[None]
    with lock:
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        probs = interpreter.get_tensor(probs_index)[0]
    return jsonify({"label": int(probs.argmax()), "probabilities": probs.tolist()})


@app.route("/ping")
def ping():
    return "ok"


app.run(host="127.0.0.1", port=port)
"""


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
        if kind in ("hemaflow", "flask"):
            body, ctype = _multipart(data, path.name)
            target = "/v1/predict" if kind == "hemaflow" else "/predict"
        else:
            from contracts.imaging import prepare_image

            arr = prepare_image(data, size).astype("float32")[None]
            body = json.dumps({"inputs": arr.tolist()}).encode()
            ctype, target = "application/json", "/invocations"
        head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
        out.append(head + body)
    return out


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection after this response)."""
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
    closes = headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0")
    return status, closes


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
                status, closes = await asyncio.wait_for(_read_response(reader), 60)
                latencies.append((time.perf_counter() - t0) * 1000.0)
                if status != 200:
                    errors += 1
                if closes:  # no keep-alive (HTTP/1.0 servers): reconnect for the next request
                    writer.close()
                    reader = writer = None
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


def _tree_pids(pid: int) -> set[int]:
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
    return pids


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a server and all its processes (Linux /proc)."""
    ticks = 0
    for p in _tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def load_main(args: argparse.Namespace) -> None:
    """Entry of the separate load-generator process: prints one JSON line per phase, with the
    server's CPU time per answered request (robust to other work on the machine, unlike req/s)."""
    images = [Path(p) for p in json.loads(Path(args.images_file).read_text())]
    reqs = _requests(args.kind, images, args.size)
    phases = json.loads(args.phases)
    asyncio.run(_drive(args.port, reqs, 1, 5, 60))  # warm-up (not reported)
    for name, concurrency, count in phases:
        cpu0 = _tree_cpu_s(args.server_pid)
        result = asyncio.run(_drive(args.port, reqs, concurrency, count, PHASE_TIME_CAP_S))
        answered = max(1, result["requests"] - result["errors"])
        result["cpu_ms_per_req"] = round((_tree_cpu_s(args.server_pid) - cpu0) * 1000 / answered, 2)
        print(json.dumps({"phase": name, "concurrency": concurrency, **result}), flush=True)


# --------------------------------------------------------------------------- servers
def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback
            return r.status == 200
    except Exception:
        return False


def _start(cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout_s: float = 180,
           cwd: Path = REPO) -> tuple[subprocess.Popen, float]:
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=str(cwd), start_new_session=True)
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


def _tree_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and all its descendants, in MB: the tree's current total and
    the largest peak (VmHWM) of any one process in it (a worker, or the server itself)."""
    pids = _tree_pids(pid)
    total = peak = 0
    for p in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0])
        peak = max(peak, int(fields.get("VmHWM", "0 kB").split()[0]))
    return {"rss_mb": round(total / 1024, 1), "peak_rss_per_process_mb": round(peak / 1024, 1), "processes": len(pids)}


def _drive_phases(kind: str, port: int, pid: int, images_file: Path, size: int, phases) -> dict[str, dict]:
    """Run the phases from a separate load-generator process; print each phase as it is measured."""
    cmd = [sys.executable, __file__, "--load", "--kind", kind, "--port", str(port), "--images-file", str(images_file),
           "--size", str(size), "--phases", json.dumps(phases), "--server-pid", str(pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    results = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        results[row["phase"]] = row
        print(f"    {row['phase']}: {row['rps']} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
              f"server CPU {row['cpu_ms_per_req']} ms/request, errors {row['errors']}/{row['requests']}", flush=True)
    return results


def _median_phases(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per phase, the median of each figure over the repeats (errors and requests summed)."""
    out = {}
    for name in runs[0]:
        rows = [r[name] for r in runs if name in r]
        med = {k: statistics.median([row[k] for row in rows if row[k] is not None] or [0.0])
               for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req")}
        out[name] = {"concurrency": rows[0]["concurrency"], "repeats": len(rows),
                     "requests": sum(row["requests"] for row in rows), "errors": sum(row["errors"] for row in rows),
                     **{k: round(v, 2) for k, v in med.items()},
                     "rps_all": [row["rps"] for row in rows]}
    return out


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


def _checkout(ref: str, into: Path) -> Path | None:
    """The serving code of `ref` (serving/ and pipeline/) in a folder of its own, or None without git."""
    into.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "serving", "pipeline"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  no baseline checkout of {ref}: {exc}", flush=True)
        return None
    return into


def _large_jpeg(source: Path, out: Path) -> Path:
    from PIL import Image

    with Image.open(source) as img:
        img.convert("RGB").resize((LARGE_SIDE, LARGE_SIDE), Image.Resampling.BICUBIC).save(out, quality=90)
    return out


class Server:
    """One server under test: how to start it, its load-generator kind, phases and results."""

    def __init__(self, name: str, kind: str, cmd: list[str], env: dict[str, str], ready_path: str, port: int,
                 phases: list, large: bool, cwd: Path = REPO) -> None:
        self.name, self.kind, self.cmd, self.env, self.port = name, kind, cmd, env, port
        self.ready_url = f"http://127.0.0.1:{port}{ready_path}"
        self.phases, self.large, self.cwd = phases, large, cwd
        self.proc: subprocess.Popen | None = None
        self.cold_start_s = 0.0
        self.runs: list[dict] = []
        self.large_runs: list[dict] = []

    def start(self, work: Path) -> None:
        self.proc, self.cold_start_s = _start(self.cmd, self.env, self.ready_url, work / f"{self.name}.log",
                                              timeout_s=300, cwd=self.cwd)
        # Several workers answer /readyz in turn: wait until a run of fresh connections all say ready.
        for _ in range(200):
            if all(_get_ok(self.ready_url) for _ in range(10)):
                break
            time.sleep(0.05)
        print(f"{self.name}: ready in {self.cold_start_s:.2f}s", flush=True)

    def summary(self) -> dict:
        assert self.proc is not None
        out = {"cold_start_s": round(self.cold_start_s, 2), "phases": _median_phases(self.runs),
               **_tree_rss_mb(self.proc.pid)}
        if self.large_runs:
            out["large"] = _median_phases(self.large_runs)
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
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--images-file", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--phases", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
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
        size = int(json.loads((bundle / "bundle.json").read_text())["image_size"])
        model_name = s.model_name(args.dataset)

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
        before = _checkout(args.baseline_ref, work / "before")
        if before is not None:
            servers.append(hemaflow("hemaflow-before", before))
        if not args.skip_flask:
            app_file = work / "flask_app.py"
            app_file.write_text(FLASK_APP)
            port = free_port()
            servers.append(Server("flask", "flask", [sys.executable, str(app_file), str(bundle / "model.tflite"),
                                                     str(port), str(size)], {}, "/ping", port, FLASK_PHASES, large=True))
        # Interleaved repeats: each server runs its phases once per round, so drifting load from
        # other work on the machine spreads over all of them. Idle servers wait, started.
        for server in servers:
            server.start(work)
        for rnd in range(1, args.repeats + 1):
            for server in servers:
                print(f"  round {rnd}/{args.repeats} {server.name}", flush=True)
                server.runs.append(_drive_phases(server.kind, server.port, server.proc.pid, images_file, size, server.phases))
                if server.large:
                    server.large_runs.append(_drive_phases(server.kind, server.port, server.proc.pid, large_file, size, LARGE_PHASES))
        report = {server.name: server.summary() for server in servers}
        for server in servers:
            _stop(server.proc)

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
            mlflow.runs.append(_drive_phases("mlflow", mport, mlflow.proc.pid, images_file, size, MLFLOW_PHASES))
            report["mlflow"] = mlflow.summary()
            _stop(mlflow.proc)
        _print(report, serving_py, args.baseline_ref)
        (work.parent / "hemaflow-bench-serving-last.json").write_text(json.dumps(report, indent=1))
    finally:
        for server in servers:
            if server.proc is not None:
                _stop(server.proc)
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
    for other, label in (("hemaflow-workers2", "SERVING_WORKERS=2"), ("hemaflow-before", f"HemaFlow at {baseline_ref}"),
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
