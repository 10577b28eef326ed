"""The load generator of benchmarks/serving.py, run as a separate process (this file), and the
measurements of a server's process tree (CPU time, resident memory) read from Linux /proc.

`drive_phases` starts it for one server: keep-alive raw HTTP/1.1 over loopback (asyncio), one JSON
line per phase with the server's CPU time per answered request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASE_TIME_CAP_S = 45.0


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


def tree_rss_mb(pid: int) -> dict[str, float]:
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


def drive_phases(kind: str, port: int, pid: int, images_file: Path, size: int, phases) -> dict[str, dict]:
    """Run the phases from a separate load-generator process; print each phase as it is measured."""
    cmd = [sys.executable, __file__, "--kind", kind, "--port", str(port), "--images-file", str(images_file),
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


def median_phases(runs: list[dict[str, dict]]) -> dict[str, dict]:
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



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=["hemaflow", "flask", "mlflow"])
    parser.add_argument("--images-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--phases", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    load_main(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
