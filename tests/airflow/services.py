"""Postgres and Redis as plain processes on loopback, as docker-compose.yml gives Airflow.

Both come from Debian's packages (`make test` installs redis-server; postgresql ships with the
machine image, else it is installed the same way). Each gets a random password, a free port and
a private folder; nothing is left behind after `stop`.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    folder: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """Postgres refuses to run as root: run it as the `postgres` account there."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql); `make test` installs it")
    return found[-1]


def start_postgres(port: int, database: str = "airflow") -> Service:
    folder = Path(tempfile.mkdtemp(prefix="hemaflow-pg-"))
    password = secrets.token_urlsafe(18)
    (folder / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(folder / "pw", "postgres", "postgres")
    data = folder / "data"
    subprocess.run(_as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--pwfile",
                                      str(folder / "pw"), "--auth=scram-sha-256", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    process = subprocess.Popen(
        _as_postgres_user([_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]),
        stdout=open(folder / "postgres.log", "wb"), stderr=subprocess.STDOUT)
    url = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/postgres"
    _wait(lambda: _pg_ready(url), "postgres", folder / "postgres.log")
    _create_database(url, database)
    return Service(url=url.rsplit("/", 1)[0] + f"/{database}", process=process, folder=folder)


def _pg_ready(url: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(url.replace("postgresql+psycopg2", "postgresql"), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def _create_database(url: str, database: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url.replace("postgresql+psycopg2", "postgresql"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{database}"')
    conn.close()


def start_redis(port: int) -> Service:
    folder = Path(tempfile.mkdtemp(prefix="hemaflow-redis-"))
    password = secrets.token_urlsafe(18)
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server); `make test` installs it")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder), "--requirepass", password],
                               stdout=open(folder / "redis.log", "wb"), stderr=subprocess.STDOUT)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    _wait(lambda: _redis_ready(url), "redis", folder / "redis.log")
    return Service(url=url, process=process, folder=folder)


def _redis_ready(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def _wait(check, what: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not start in {timeout_s:.0f}s:\n{log.read_text(errors='replace')[-2000:]}")
