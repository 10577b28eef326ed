"""Manifest diff, duplicate resolution, dataset_version and the local content-addressed cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from pipeline.cache import cache_path, clean_stale_temporaries, write_cached
from pipeline.manifests import diff_listing
from pipeline.preprocess import dataset_version
from contracts.settings import get_settings
from pipeline.validate import resolve_duplicates


def _row(key, etag="e", size=10, sha="s", label="a"):
    return {"key": key, "etag": etag, "bytes": size, "sha256": sha, "label": label}


def test_diff_listing_by_key_etag_and_size():
    previous = {k: _row(k) for k in ("a", "b", "c", "d")}
    listing = [
        {"Key": "a", "ETag": '"e"', "Size": 10},  # unchanged
        {"Key": "b", "ETag": '"other"', "Size": 10},  # etag changed
        {"Key": "c", "ETag": '"e"', "Size": 11},  # size changed
        {"Key": "new", "ETag": '"e"', "Size": 10},
    ]
    new, changed, unchanged, deleted = diff_listing(previous, listing)
    assert [o["Key"] for o in new] == ["new"]
    assert sorted(o["Key"] for o in changed) == ["b", "c"]
    assert unchanged == [previous["a"]]  # the previous row is reused as is
    assert deleted == ["d"]
    assert diff_listing({}, listing)[0] == listing


def test_resolve_duplicates_keeps_one_same_label_copy_and_flags_conflicts():
    rows = [_row("x/2", sha="h1"), _row("x/1", sha="h1"), _row("y/1", sha="h2", label="a"),
            _row("z/1", sha="h2", label="b"), _row("w/1", sha="h3")]
    kept, dropped, conflicting = resolve_duplicates(rows)
    assert [r["key"] for r in kept] == ["w/1", "x/1"]
    assert [(r["key"], r["duplicate_of"]) for r in dropped] == [("x/2", "x/1")]
    assert sorted(r["key"] for r in conflicting) == ["y/1", "z/1"]


def test_dataset_version_depends_on_content_labels_and_parameters():
    pairs = [("h1", "a"), ("h2", "b")]
    prep, splits = {"image_size": 224}, {"salt": "s"}
    v = dataset_version(pairs, ["a", "b"], prep, splits)
    assert v == dataset_version(list(reversed(pairs)), ["a", "b"], prep, splits)  # order-free
    others = {
        dataset_version([("h1", "a"), ("h2", "a")], ["a", "b"], prep, splits),  # a label changed
        dataset_version(pairs + [("h3", "a")], ["a", "b"], prep, splits),  # an image added
        dataset_version(pairs, ["a", "b"], {"image_size": 128}, splits),  # preprocessing changed
        dataset_version(pairs, ["a", "b"], prep, {"salt": "t"}),  # split salt changed
    }
    assert v not in others and len(others) == 4


def test_write_cached_is_content_addressed_and_leaves_no_temporaries(tmp_path):
    s = get_settings(hemaflow_home=tmp_path)
    data = b"hello image"
    sha = hashlib.sha256(data).hexdigest()
    path = write_cached(s, sha, data)
    assert path == cache_path(s, sha) and path.parent.name == sha[:2] and path.read_bytes() == data
    assert list((path.parent.parent / ".tmp").iterdir()) == []


def test_stale_temporaries_are_removed_only_when_no_writer_holds_them(tmp_path):
    """Another container's live writer (its pid means nothing here) keeps its file; a dead one's goes."""
    s = get_settings(hemaflow_home=tmp_path)
    tmp_dir = tmp_path / "cache" / "objects" / ".tmp"
    tmp_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    old = time.time() - 3600
    for name in (f"{dead}-abandoned.part", f"{dead}-other-namespace.part", f"{dead}-just-opened.part"):
        (tmp_dir / name).write_bytes(b"partial")
    for name in (f"{dead}-abandoned.part", f"{dead}-other-namespace.part"):
        os.utime(tmp_dir / name, (old, old))
    writer = subprocess.Popen(  # holds the lock like write_cached does, from a pid that looks dead here
        [sys.executable, "-c", "import fcntl, sys, time; fh = open(sys.argv[1], 'ab'); "
         "fcntl.flock(fh, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(tmp_dir / f"{dead}-other-namespace.part")], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert clean_stale_temporaries(s) == 1
        assert sorted(p.name for p in tmp_dir.iterdir()) == [f"{dead}-just-opened.part",
                                                              f"{dead}-other-namespace.part"]
    finally:
        writer.kill()
        writer.wait()
    assert clean_stale_temporaries(s) == 1  # its writer is gone now
    assert [p.name for p in tmp_dir.iterdir()] == [f"{dead}-just-opened.part"]


def test_unreachable_s3_endpoint_fails_clearly_after_bounded_retries(tmp_path, caplog):
    import logging
    import socket
    import time

    from pipeline.ingest import ingest
    from pipeline.storage import StorageUnavailable

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = get_settings(hemaflow_home=tmp_path, s3_endpoint_url=f"http://127.0.0.1:{port}", s3_max_attempts=3,
                     s3_connect_timeout_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="botocore.retries.standard"):
        with pytest.raises(StorageUnavailable) as info:
            ingest("leukemia", s)
    elapsed = time.monotonic() - started
    retries = [r for r in caplog.records if "Retry needed" in r.getMessage()]
    assert len(retries) == 2  # 3 attempts = 2 retries, each after a backoff delay
    assert f"127.0.0.1:{port}" in str(info.value) and "3 attempts" in str(info.value)
    assert elapsed < 15, elapsed  # bounded: 3 attempts with capped backoff, no hang
