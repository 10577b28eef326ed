"""Where one prediction's time goes: the parts of a request measured in-process, then the whole
request against a running `python -m serving`, so what is left over is HTTP + framework.

In-process spans (median over the images, after a warm-up; one thread, the machine's other load
included): header check, JPEG decode + resize (`contracts.imaging.prepare_image`), the LiteRT call
alone (one-thread interpreter, as in serving; and a two-thread one), the out-of-scope detector,
building the response object and encoding it as JSON. Batch scaling: a one-thread interpreter's
time per image at batch 1, 2, 4, 8 (is micro-batching worth it?). End to end: sequential keep-alive
requests from a separate process, server CPU time per request (/proc) and client p50. With
`--cprofile`, instead, the event-loop thread of an in-process server is profiled (top functions).

    .venv/bin/python benchmarks/serving_profile.py --bundle DIR --public-key KEY [--data DIR] [--images 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH_SIZES = (1, 2, 4, 8)


def _median_ms(fn, items, repeats: int = 1, clock=time.thread_time) -> float:
    """Median milliseconds of fn(item) by `clock`: this thread's CPU time by default (other jobs on
    the machine then do not count), `time.perf_counter` for work spread over several threads."""
    times = []
    for item in items:
        for _ in range(repeats):
            t0 = clock()
            fn(item)
            times.append((clock() - t0) * 1000.0)
    return round(statistics.median(times), 3)


def _images(data: Path | None, count: int, work: Path) -> list[bytes]:
    jpegs = sorted(data.rglob("*.jpg"))[:count] if data and data.is_dir() else []
    if jpegs:
        return [p.read_bytes() for p in jpegs]
    from tests.fixtures.data import encode, make_image  # generated images when the dataset is absent

    return [encode(make_image(i, (200, 60 + i % 50, 120), (257, 257)), "JPEG", quality=90) for i in range(count)]


def in_process(bundle: Path, public_key: str, images: list[bytes]) -> dict[str, float]:
    import numpy as np

    from contracts.bundle import TFLiteRunner, read_local_bundle
    from contracts.imaging import prepare_image, read_header
    from contracts.settings import Settings
    from contracts.signing import parse_public_keys
    from serving.batcher import split_outputs
    from serving.bundle import load_bundle
    from serving.inference import Inference, crop_policy
    from serving.metrics import ServingMetrics
    from serving.upload import UploadedFile

    settings = Settings(_env_file=None, bundle_trusted_public_keys=public_key)
    files = read_local_bundle(bundle)
    model = load_bundle(files, trusted_keys=parse_public_keys(public_key), num_threads=1)
    size, crop = model.image_size, crop_policy(model)
    prepared = [prepare_image(d, size, crop=crop) for d in images]
    one, two = TFLiteRunner(files["model.tflite"], 1), TFLiteRunner(files["model.tflite"], 2)
    for runner in (one, two):
        for _ in range(5):
            runner(prepared[0][None])
    inference = Inference(settings, ServingMetrics())
    upload = UploadedFile("file", "x.jpg", "image/jpeg", bytearray(images[0]))
    outputs = [split_outputs(model.predict_outputs(p[None]))[0] for p in prepared]
    pairs = list(zip(prepared, outputs, strict=True))
    result = inference.result(model, upload, prepared[0], outputs[0], False, time.perf_counter())
    parts = {
        "header check": _median_ms(lambda d: read_header(d, settings.max_image_pixels), images),
        "decode + resize": _median_ms(lambda d: prepare_image(d, size, settings.max_image_pixels, crop=crop), images),
        "LiteRT invoke, 1 thread": _median_ms(lambda p: one(p[None]), prepared, 3),
        "LiteRT invoke, 2 threads (wall)": _median_ms(lambda p: two(p[None]), prepared, 3, time.perf_counter),
        "LiteRT invoke, 2 threads (CPU)": _median_ms(lambda p: two(p[None]), prepared, 3, time.process_time),
        "out-of-scope detector": _median_ms(lambda po: inference.scope(model, po[0], po[1][2]), pairs),
        "response object incl. detector": _median_ms(
            lambda po: inference.result(model, upload, po[0], po[1], False, time.perf_counter()), pairs),
        "JSON encoding": _median_ms(lambda _: result.model_dump_json(), prepared, 50),
    }
    for n in BATCH_SIZES:
        batch = np.stack([prepared[i % len(prepared)] for i in range(n)])
        parts[f"invoke batch {n}, 1 thread, per image"] = round(_median_ms(lambda b: one(b), [batch] * 20) / n, 3)
    inference.pool.shutdown()
    return parts


def end_to_end(bundle: Path, public_key: str, images: list[bytes], work: Path, count: int) -> dict:
    """Sequential requests against `python -m serving` (shipped defaults) from a separate process."""
    from benchmarks.serving_baselines import _start, stop_server
    from benchmarks.serving_load import drive_phases
    from ops.stack import free_port

    images_file = _images_file(images, work)
    port = free_port()
    env = {"SERVING_BUNDLE_PATH": str(bundle), "BUNDLE_TRUSTED_PUBLIC_KEYS": public_key,
           "SERVING_POLL_INTERVAL_S": "0", "HEMAFLOW_ENV_FILE": "", "PYTHONPATH": str(REPO)}
    proc, _ = _start([sys.executable, "-m", "serving", "--port", str(port), "--log-level", "warning"], env,
                     f"http://127.0.0.1:{port}/readyz", work / "server.log")
    try:
        return drive_phases("hemaflow", port, proc.pid, images_file, _size(bundle),
                            [("sequential", 1, count), ("c=8", 8, 2 * count)])
    finally:
        stop_server(proc)


def _images_file(images: list[bytes], work: Path) -> Path:
    paths = []
    for i, data in enumerate(images):
        (work / f"img{i}.jpg").write_bytes(data)
        paths.append(str(work / f"img{i}.jpg"))
    (work / "images.json").write_text(json.dumps(paths))
    return work / "images.json"


def _size(bundle: Path) -> int:
    return int(json.loads((bundle / "bundle.json").read_text())["image_size"])


def profile_event_loop(bundle: Path, public_key: str, images: list[bytes], work: Path, count: int) -> None:
    """cProfile of the server's event-loop thread (HTTP, multipart, routing, dependencies) while a
    separate process sends `count` sequential requests; prints the top functions by own time."""
    import cProfile
    import pstats
    import threading

    import uvicorn

    from benchmarks.serving_load import drive_phases
    from ops.stack import free_port

    os.environ.update({"SERVING_BUNDLE_PATH": str(bundle), "BUNDLE_TRUSTED_PUBLIC_KEYS": public_key,
                       "SERVING_POLL_INTERVAL_S": "0", "HEMAFLOW_ENV_FILE": ""})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config("serving.app:create_app", factory=True, port=port,
                                           log_level="warning", access_log=False))
    images_file = _images_file(images, work)

    def load() -> None:
        while not server.started:
            time.sleep(0.05)
        try:
            drive_phases("hemaflow", port, os.getpid(), images_file, _size(bundle), [("sequential", 1, count)])
        finally:
            server.should_exit = True

    threading.Thread(target=load, daemon=True).start()
    profiler = cProfile.Profile()
    profiler.runcall(server.run)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--public-key", required=True, help="the bundle's signing public key (base64)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "leukemia"))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--cprofile", action="store_true",
                        help="instead: profile the event-loop thread of an in-process server (slower)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hemaflow-profile-") as tmp:
        work = Path(tmp)
        images = _images(Path(args.data), args.images, work)
        bundle = Path(args.bundle).resolve()
        parts = in_process(bundle, args.public_key, images)
        if args.cprofile:
            profile_event_loop(bundle, args.public_key, images, work, args.requests)
            return 0
        e2e = end_to_end(bundle, args.public_key, images, work, args.requests)
    print("\nin-process spans (ms of CPU unless marked wall, median):")
    for name, ms in parts.items():
        print(f"  {name:<38} {ms:>7}")
    seq = e2e["sequential"]
    inside = sum(parts[k] for k in ("header check", "decode + resize", "LiteRT invoke, 1 thread",
                                    "response object incl. detector", "JSON encoding"))
    print(f"end to end, sequential: p50 {seq['p50_ms']} ms, server CPU {seq['cpu_ms_per_req']} ms/request; "
          f"the parts above sum to {inside:.2f} ms, so HTTP + multipart + routing + threads ~ "
          f"{seq['cpu_ms_per_req'] - inside:.2f} ms CPU; c=8: server CPU {e2e['c=8']['cpu_ms_per_req']} ms/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
