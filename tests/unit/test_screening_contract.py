"""The screening storage contract: safe batch ids and one S3 layout for every stage."""

import pytest

from contracts.screening import (
    InvalidBatchId,
    ReviewDecision,
    check_batch_id,
    inbox_prefix,
    is_reviewed_key,
    result_image_key,
    results_prefix,
    review_key,
)


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "x" * 65, "sp ace", "é"])
def test_unsafe_batch_ids_are_refused(bad):
    with pytest.raises(InvalidBatchId):
        check_batch_id(bad)


def test_layout_keys():
    assert inbox_prefix("leukemia") == "inbox/leukemia/"
    assert inbox_prefix("leukemia", "2026-12-02_slide.7") == "inbox/leukemia/2026-12-02_slide.7/"
    assert results_prefix("pbc8", "b1", 3) == "results/pbc8/b1/3/"
    assert review_key("pbc8", "b1") == "reviews/pbc8/b1.jsonl"
    assert result_image_key("pbc8", "b1", 3, "heatmaps", "ab" * 32) == f"results/pbc8/b1/3/heatmaps/{'ab' * 32}.jpg"
    assert is_reviewed_key("raw/pbc8/eos/reviewed-b1-0123abcd.png") and not is_reviewed_key("raw/reviewed-x/eos/a.png")
    with pytest.raises(ValueError):
        result_image_key("pbc8", "b1", 3, "heatmaps", "../x")


def test_review_decision_round_trip_ignores_unknown_fields():
    decision = ReviewDecision(
        review_id="r1", dataset="leukemia", batch_id="b1", image_key="inbox/leukemia/b1/a.jpg",
        sha256="ab" * 32, model_version="3", predicted_label="normal", reviewed_label="abnormal",
        reviewer="alice", reviewed_at="2026-12-02T04:00:00Z",
    )
    data = decision.to_dict() | {"added_later": 1}
    assert ReviewDecision.from_dict(data) == decision
    assert not decision.confirmed
