"""Split-conformal ranks, shared by the out-of-scope detector (training.ood: the upper tail of
in-scope validation scores) and the conformal decision threshold (training.evaluate: the lower
tail of positive validation scores). Both promise a rate on unseen exchangeable images, whatever
the scores' distribution."""

from __future__ import annotations

import math

# (n + 1)(1 - alpha) is often an integer in exact arithmetic (n = 399, alpha = 0.25 %) and a hair
# above it in floating point; the rank must not jump to the next image for that.
_ROUNDING = 1e-9


def conformal_rank(n: int, alpha: float) -> int:
    """Rank k (1-based, ascending) among n calibration scores such that a new exchangeable score is
    <= the k-th smallest with probability >= k / (n + 1) >= 1 - alpha. k > n: too few scores."""
    return math.ceil((n + 1) * (1 - alpha) - _ROUNDING)


def lower_conformal_rank(n: int, alpha: float) -> int:
    """Rank j (1-based, ascending) such that a new exchangeable score falls below the j-th smallest
    of n with probability j / (n + 1) <= alpha; 0 when n is too small for any (n < 1 / alpha - 1)."""
    return n + 1 - conformal_rank(n, alpha)
