"""benchmarks/threshold_rules.py --missed-csv: the positives every lever misses, named by file."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

from contracts.dataset_spec import parse_spec


def test_missed_csv_lists_only_what_every_lever_missed_once_each(tmp_path):
    from benchmarks.threshold_rules import write_missed_csv

    spec = parse_spec('name = "x"\npositive_label = "abnormal"\n[classes]\nBlast = "abnormal"\nBenign = "normal"\n')
    data = tmp_path / "x"
    files = {"Blast/a.jpg": b"a", "Blast/b.jpg": b"b", "Blast/copy-of-a.jpg": b"a", "Benign/c.jpg": b"c"}
    for rel, body in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)
    sha = {body: hashlib.sha256(body).hexdigest() for body in (b"a", b"b", b"c")}
    counts = Counter({sha[b"a"]: 3, sha[b"b"]: 2})  # a: missed by all 3 levers, b: by 2
    out = tmp_path / "missed.csv"
    assert write_missed_csv(out, data, spec, counts, levers=3) == 1
    rows = list(csv.DictReader(out.open()))
    assert rows == [{"sha256": sha[b"a"], "file": "Blast/a.jpg", "class_folder": "Blast"}]
    assert not list(tmp_path.glob("*.tmp"))
