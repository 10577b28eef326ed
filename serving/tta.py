"""Test-time augmentation in the API (INFERENCE_TTA; the views: contracts.tta): one interpreter
call for an image's 8 views, their probabilities averaged. The Grad-CAM map and the pooled
features (what the out-of-scope detector scores, fitted on un-augmented images) stay those of
the original image, the first view.
"""

from __future__ import annotations

import numpy as np

from contracts.tta import VIEWS, average, views
from serving.batcher import Result

__all__ = ["merge", "views"]  # views re-exported: the API's call sites read tta.views / tta.merge


def merge(outputs: list[Result], count: int) -> list[Result]:
    """Per original image: mean probabilities over its views; class map and features of view 0."""
    probs = average(np.stack([o[0] for o in outputs]))
    return [(probs[i], outputs[i * VIEWS][1], outputs[i * VIEWS][2]) for i in range(count)]
