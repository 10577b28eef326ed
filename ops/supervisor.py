"""Process supervision for the local stack and the demo: start a command in its own session with a
pid file (pid + kernel start time, so a reused pid is never mistaken for ours), find it again,
wait for it to be healthy, stop its process group. Files live under `<HEMAFLOW_HOME>/stack`:
`run/<name>.pid`, `logs/<name>.log`, `data/<name>/`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from contracts.process_identity import pid_alive, process_start_time
from contracts.settings import Settings

HEALTH_TIMEOUT_S = 90.0


STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """A local service failed to start, or stop, cleanly."""


def stack_dir(settings: Settings) -> Path:
    return settings.hemaflow_home / "stack"


def process_paths(settings: Settings, name: str) -> tuple[Path, Path, Path]:
    base = stack_dir(settings)
    return base / "run" / f"{name}.pid", base / "logs" / f"{name}.log", base / "data" / name


def find_executable(name: str) -> str:
    """An executable from this interpreter's environment, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed; run 'make install' first")
    return found


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until `pid` has exited; our own child is reaped (no zombie left behind).

    A process whose main thread has exited shows as a zombie while its other threads still
    run, so for our children only waitpid() says it is really gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: its own parent (or init) reaps it
            if not pid_alive(pid):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid of the process we started for `name`, or None if it is gone (or the pid was reused)."""
    pid_file, _, _ = process_paths(settings, name)
    try:
        meta = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return None
    pid = int(meta.get("pid", 0))
    if pid <= 0 or not pid_alive(pid):
        return None
    started = meta.get("start_time")
    if started is not None:
        return pid if process_start_time(pid) == started else None
    # Pid files written before start times were recorded: the command line must still match.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    marker = meta.get("marker")
    return pid if marker and marker in cmdline else None


def start_process(
    settings: Settings, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> int:
    """Start `cmd` in its own session, logging to the service's log; records its pid file."""
    pid_file, log_file, data_dir = process_paths(settings, name)
    for d in (pid_file.parent, log_file.parent, data_dir):
        d.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} ---\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or data_dir),
            start_new_session=True,
        )
    tmp = pid_file.with_suffix(".tmp")
    # pid + kernel start time tell our process from a later one that reuses the pid.
    meta = {"pid": proc.pid, "start_time": process_start_time(proc.pid), "cmd": cmd}
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, pid_file)
    return proc.pid


def stop_process(settings: Settings, name: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the process group we started for `name`; returns True if something was stopped."""
    pid_file, _, _ = process_paths(settings, name)
    pid = read_pid(settings, name)
    stopped = False
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_gone(pid, timeout_s):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 5.0)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def http_ok(url: str, timeout_s: float = 2.0, accept: tuple[int, ...] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback URLs
            return resp.status in accept
    except urllib.error.HTTPError as exc:
        return exc.code in accept
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(check, what: str, log: Path, pid_of=None, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if pid_of is not None and pid_of() is None:
            raise StackError(f"{what} exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(0.25)
    raise StackError(f"{what} was not healthy after {timeout_s:.0f}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def managed_names(settings: Settings) -> list[str]:
    run = stack_dir(settings) / "run"
    return sorted(p.stem for p in run.glob("*.pid")) if run.is_dir() else []


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
