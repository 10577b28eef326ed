"""benchmarks/threshold_rules.py --missed-csv: the positives every lever misses, named by file."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

import pytest

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


def test_quantile_read_out_aims_at_the_target_between_the_two_pipeline_rules():
    """250 validation positives and one unseen positive, 100 000 times: `quantile` (rank 2.51 of 250,
    interpolated between the 2nd and 3rd lowest in logit space) lets an unseen one fall below with
    probability ~0.0100, between conformal's 2/251 and the validation rule's 3/251."""
    import numpy as np

    from benchmarks.threshold_rules import quantile_threshold

    rng = np.random.default_rng(0)
    trials, n, target = 100_000, 250, 0.99
    logits = np.sort(rng.logistic(size=(trials, n)), axis=1)  # logistic logits: the rule is exact on them
    val = 1 / (1 + np.exp(-logits))
    unseen = 1 / (1 + np.exp(-rng.logistic(size=trials)))
    is_pos = np.ones(n, bool)
    first = quantile_threshold(is_pos, val[0], target)
    assert val[0, 1] < first < val[0, 2]
    expected = 1 / (1 + np.exp(-(logits[0, 1] + 0.51 * (logits[0, 2] - logits[0, 1]))))
    assert first == pytest.approx(expected, rel=1e-9)
    thresholds = np.array([quantile_threshold(is_pos, v, target) for v in val[:20_000]])
    assert 0.0085 < np.mean(unseen[:20_000] < thresholds) < 0.0115  # ~0.0100, +- 2.5 standard errors
    few = np.linspace(0.3, 1.0, 50)  # (1 - 0.99) * 51 < 1: the lowest, as conformal
    assert quantile_threshold(np.ones(50, bool), few, 0.99) == pytest.approx(0.3)
    assert quantile_threshold(np.zeros(3, bool), few[:3], 0.99) == 0.5
