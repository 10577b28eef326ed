"""Review order and the serving image's dependencies (no boto3, no TensorFlow) for the review queue."""

from __future__ import annotations

import subprocess
import sys

from serving.review_queue import parse_predictions, review_order
from tests.helpers import REPO_ROOT

CSV = """key,sha256,label,confidence,in_scope,rank,error,p_a,p_b,p_c
k1,s1,a,0.50,true,,,0.50,0.30,0.20
k2,s2,b,0.90,false,,,0.05,0.90,0.05
k3,s3,,,,,not_an_image,,,
k4,s4,a,0.40,,,,0.40,0.35,0.25
"""


def test_multiclass_lowest_confidence_first_and_refused_apart():
    labels, items, refused = parse_predictions(CSV)
    assert labels == ["a", "b", "c"] and refused == [{"key": "k3", "sha256": "s3", "error": "not_an_image"}]
    assert [row["key"] for row in review_order(items, labels, None)] == ["k4", "k1", "k2"]
    assert [row["in_scope"] for row in items] == [True, False, None]


def test_binary_highest_positive_first_and_scorer_rank_wins():
    text = "key,sha256,label,confidence,in_scope,rank,error,p_neg,p_pos\n" \
           "x,1,neg,0.8,,,,0.8,0.2\ny,2,pos,0.9,,,,0.1,0.9\nz,3,neg,0.6,,,,0.6,0.4\n"
    labels, items, _ = parse_predictions(text)
    assert [r["key"] for r in review_order(items, labels, "pos")] == ["y", "z", "x"]
    ranked = text.replace(",,,0.8,0.2", ",3,,0.8,0.2").replace(",,,0.1,0.9", ",2,,0.1,0.9").replace(",,,0.6,0.4", ",1,,0.6,0.4")
    labels, items, _ = parse_predictions(ranked)
    assert [r["key"] for r in review_order(items, labels, "pos")] == ["z", "y", "x"]


def test_review_queue_imports_without_boto3_or_tensorflow():
    """The serving image has neither: the review routes must not need them."""
    code = ("import sys; sys.modules.update(boto3=None, botocore=None, tensorflow=None)\n"
            "import serving.app, serving.api.batches, serving.api.contributions, serving.review_queue, serving.s3\n"
            "import contracts.reviews\n"
            "from contracts.settings import Settings\n"
            "serving.review_queue.ScreeningStore(Settings()).client  # the client serving really builds\n"
            "assert not {'boto3', 'botocore', 'tensorflow'} & {m for m in sys.modules if sys.modules[m] is not None}\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
