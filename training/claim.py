"""One training per configuration, even when the CLI and the DAG start it at the same moment.

The MLflow training run itself is the claim: it is created (RUNNING, tagged with the
config hash and with the host and process that own it) before anything is fitted. After
CLAIM_SETTLE_S, every claimant looks at the live claims for its config hash: the earliest
(start time, then run id) trains; the others stand down (their run ends KILLED with a
`duplicate_of` tag, nothing is registered). The winner looks again just before it
registers, so two claims made within the same instant, or on hosts whose clocks differ,
still register one version: by then each sees the other's claim, or the version it
registered (a run registers its version before it ends).

A claim is live while its run is RUNNING, younger than `claim_expiry_s`, its heartbeat
(a tag the claimant refreshes every CLAIM_HEARTBEAT_S while it trains) is fresher than
CLAIM_STALE_S and, when it was made on this host, its process still exists. So an Airflow
retry after an attempt killed with its worker, on this host or another one (a lost
container), takes over within minutes instead of waiting for the expiry.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from contracts.process_identity import pid_alive, process_start_time
from contracts.settings import Settings
from training.tracking import TAG_CONFIG_HASH

CLAIM_SETTLE_S = 2.0
TAG_HOST = "claim_host"
TAG_PID = "claim_pid"
TAG_PID_START = "claim_pid_start"
TAG_DUPLICATE_OF = "duplicate_of"
TAG_HEARTBEAT = "claim_heartbeat"  # unix seconds of the claimant's last sign of life
CLAIM_HEARTBEAT_S = 30.0
CLAIM_STALE_S = 300.0  # ten missed heartbeats: the claimant is gone (a slow MLflow is not enough)
STOOD_DOWN = "KILLED"


def host_id() -> str:
    """This host and process namespace: containers that share a hostname do not share pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "-"
    return f"{socket.gethostname()}/{namespace}"


def claim_tags() -> dict[str, str]:
    pid = os.getpid()
    return {TAG_HOST: host_id(), TAG_PID: str(pid), TAG_PID_START: str(process_start_time(pid)),
            TAG_HEARTBEAT: str(int(_now_s()))}


def _now_s() -> float:
    return datetime.now(timezone.utc).timestamp()


@contextmanager
def heartbeat(client, run_id: str, every_s: float = CLAIM_HEARTBEAT_S) -> Iterator[None]:
    """Refresh the claim's heartbeat tag in the background while the body (training) runs."""
    stop = threading.Event()

    def _beat() -> None:
        while not stop.wait(every_s):
            try:
                client.set_tag(run_id, TAG_HEARTBEAT, str(int(_now_s())))
            except Exception:  # noqa: BLE001 - MLflow briefly down: the next beat tries again
                continue

    thread = threading.Thread(target=_beat, name=f"claim-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _heartbeat_stale(run) -> bool:
    last = run.data.tags.get(TAG_HEARTBEAT)
    last_s = float(last) if last else run.info.start_time / 1000
    return _now_s() - last_s > CLAIM_STALE_S


def claim_expiry_s(s: Settings) -> float:
    """Longest a training run can hold its claim (the DAG's train task times out at the same)."""
    return s.train_time_budget_s * 2 + 1800


def _owner_gone(tags: dict[str, str]) -> bool:
    """True only when the claim was made on this host and its process no longer exists."""
    if tags.get(TAG_HOST) != host_id():
        return False
    pid = int(tags.get(TAG_PID) or 0)
    return not pid_alive(pid) or str(process_start_time(pid)) != tags.get(TAG_PID_START)


def live_claims(client, experiment_id: str, chash: str, s: Settings) -> list:
    """RUNNING runs of this config hash whose claim still holds, earliest first."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{TAG_CONFIG_HASH} = '{chash}' and attributes.status = 'RUNNING'"
    )
    oldest_ms = (_now_s() - claim_expiry_s(s)) * 1000
    live = [r for r in runs
            if r.info.start_time >= oldest_ms and not _heartbeat_stale(r) and not _owner_gone(r.data.tags)]
    return sorted(live, key=lambda r: (r.info.start_time, r.info.run_id))


def describe(run) -> str:
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
    tags = run.data.tags
    return f"run {run.info.run_id} (started {started} on {tags.get(TAG_HOST, '?')}, pid {tags.get(TAG_PID, '?')})"


def stand_down(client, run_id: str, winner: str) -> None:
    """End this claimant's run as KILLED, naming what it stood down for (run id or model version)."""
    import mlflow

    client.set_tag(run_id, TAG_DUPLICATE_OF, winner)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(STOOD_DOWN)
    else:
        client.set_terminated(run_id, STOOD_DOWN)
