"""Small pure helpers every package may use: hashing, ids, JSONL encoding, owner-only files, progress bars."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def write_private_file(path: Path, text: str) -> None:
    """Owner-only file (secrets), written to a temp name and renamed: never half-written, never
    world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """A sortable id fragment, e.g. 20261121T235501Z-ab12 (sub-second collisions are unlikely, not impossible)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable value with sorted keys: same content -> same id."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def progress(items: Iterable[T], total: int | None, desc: str, enabled: bool = True) -> Iterator[T]:
    """A tqdm bar on stderr when enabled (CLI), silent otherwise (library, tests, Airflow logs)."""
    if not enabled:
        yield from items
        return
    with tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar


def to_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows).encode("utf-8")


def from_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
