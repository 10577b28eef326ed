"""Drift tests of a scored batch or a new dataset version against the champion's training profile
(the profile's format and colour statistics: contracts.drift).

`drift_report` compares new images with the profile by three tests, each at DRIFT_ALPHA:

- colour: per-statistic two-sample KS (Bonferroni over the statistics) AND a standardised mean
  difference (SMD, in training standard deviations) of at least DRIFT_MIN_EFFECT, so a large
  batch does not flag a trivial shift;
- features: squared MMD with an RBF kernel (median-distance bandwidth) on standardised pooled
  features, p-value by permutation (DRIFT_PERMUTATIONS);
- label mix: chi-square of the predicted (or, for a dataset version, true) label counts against
  the training label proportions.

Level "strong" = an SMD of at least DRIFT_STRONG_EFFECT or two drifted tests. Numpy/SciPy only:
importable by the LiteRT scoring task (no TensorFlow).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from contracts.drift import FEATURES_SAMPLE, ProfileError, image_stats, load_profile, sample_rows

STD_FLOOR = 1e-3  # a constant statistic in training still gets a finite SMD
LEVELS = ("none", "drift", "strong")


@dataclass(frozen=True)
class DriftThresholds:
    alpha: float = 0.01
    min_effect: float = 0.5
    strong_effect: float = 1.5
    min_images: int = 20
    permutations: int = 200

    @classmethod
    def from_settings(cls, s: Any | None = None) -> "DriftThresholds":
        from contracts.settings import get_settings

        s = s or get_settings()
        return cls(s.drift_alpha, s.drift_min_effect, s.drift_strong_effect, s.drift_min_images,
                   s.drift_permutations)


# --- tests ---------------------------------------------------------------------------------

@dataclass
class DriftCheck:
    """One test: `tested` false says why in `detail`; `effect` is the colour test's max |SMD|."""

    name: str
    tested: bool
    drifted: bool = False
    statistic: float | None = None
    p_value: float | None = None
    effect: float | None = None
    detail: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)


def colour_drift(profile: dict[str, Any], stats: np.ndarray, t: DriftThresholds) -> DriftCheck:
    from scipy.stats import ks_2samp

    colour = profile["colour"]
    ref = np.asarray(colour["sample"], np.float64)
    mean, std = np.asarray(colour["mean"]), np.maximum(np.asarray(colour["std"]), STD_FLOOR)
    smd = (stats.mean(axis=0) - mean) / std
    per_stat_alpha = t.alpha / len(colour["names"])
    rows, drifted = [], []
    for j, name in enumerate(colour["names"]):
        p = float(ks_2samp(ref[:, j], stats[:, j]).pvalue)
        hit = p < per_stat_alpha and abs(smd[j]) >= t.min_effect
        rows.append({"stat": name, "train_mean": float(mean[j]), "batch_mean": float(stats[:, j].mean()),
                     "smd": float(smd[j]), "ks_p": p, "drifted": bool(hit)})
        if hit:
            drifted.append(name)
    worst = int(np.argmax(np.abs(smd)))
    return DriftCheck(
        "colour", True, bool(drifted), statistic=float(abs(smd[worst])),
        p_value=min(1.0, min(r["ks_p"] for r in rows) * len(rows)), effect=float(abs(smd[worst])),
        detail=(f"drifted: {', '.join(drifted)}" if drifted else "no colour statistic drifted")
        + f"; largest |SMD| {abs(smd[worst]):.2f} ({colour['names'][worst]})", rows=rows)


def _mmd2(k: np.ndarray, first: np.ndarray) -> float:
    """Biased squared MMD from a pooled kernel matrix and a boolean mask of the first sample."""
    second = ~first
    return float(k[np.ix_(first, first)].mean() + k[np.ix_(second, second)].mean()
                 - 2 * k[np.ix_(first, second)].mean())


def feature_drift(profile: dict[str, Any], features: np.ndarray, t: DriftThresholds, seed: int = 0) -> DriftCheck:
    ref = np.asarray(profile["features"]["sample"], np.float64)
    batch = sample_rows(np.asarray(features, np.float64), FEATURES_SAMPLE, seed)
    if batch.shape[1] != ref.shape[1]:
        raise ProfileError(f"pooled features have {batch.shape[1]} dimensions, the profile {ref.shape[1]}")
    mu, sd = ref.mean(axis=0), ref.std(axis=0)
    keep = sd > 1e-8
    pooled = (np.vstack([ref, batch])[:, keep] - mu[keep]) / sd[keep]
    sq = np.sum(pooled**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    bandwidth = float(np.median(d2[np.triu_indices(len(pooled), 1)])) or 1.0
    k = np.exp(-d2 / bandwidth)
    first = np.zeros(len(pooled), bool)
    first[: len(ref)] = True
    observed = _mmd2(k, first)
    rng = np.random.default_rng(seed)
    exceed = sum(_mmd2(k, rng.permutation(first)) >= observed for _ in range(t.permutations))
    p = (exceed + 1) / (t.permutations + 1)
    return DriftCheck("features", True, p < t.alpha, statistic=observed, p_value=float(p),
                      detail=f"MMD² {observed:.4f} on {len(batch)} vs {len(ref)} images, {int(keep.sum())} dims, "
                             f"permutation p={p:.4f}")


def label_mix_drift(profile: dict[str, Any], labels: Sequence[str], t: DriftThresholds,
                    source: str = "predicted") -> DriftCheck:
    from scipy.stats import chisquare

    train = profile["label_mix"]
    seen = Counter(str(v) for v in labels)
    names = sorted(set(train) | set(seen))
    ref = np.array([train.get(n, 0) for n in names], np.float64) + 0.5  # smoothed: no zero expectation
    observed = np.array([seen.get(n, 0) for n in names], np.float64)
    expected = ref / ref.sum() * observed.sum()
    stat, p = chisquare(observed, expected)
    mix = ", ".join(f"{n} {seen.get(n, 0) / len(labels):.0%} (train {train.get(n, 0) / max(sum(train.values()), 1):.0%})"
                    for n in names)
    return DriftCheck("label_mix", True, bool(p < t.alpha), statistic=float(stat), p_value=float(p),
                      detail=f"{source} labels: {mix}")


# --- report --------------------------------------------------------------------------------

@dataclass
class DriftResult:
    """The drift of one batch or dataset version; `html_section()` goes into its report."""

    subject: str
    n_images: int
    reference: str  # dataset version of the training profile
    checks: list[DriftCheck]
    strong_effect: float

    @property
    def tested(self) -> bool:
        """False when no test ran (no profile, too few images): the level "none" then says nothing."""
        return any(c.tested for c in self.checks)

    @property
    def level(self) -> str:
        hits = [c for c in self.checks if c.drifted]
        if any((c.effect or 0) >= self.strong_effect for c in hits) or len(hits) >= 2:
            return "strong"
        return "drift" if hits else "none"

    def check(self, name: str) -> DriftCheck | None:
        return next((c for c in self.checks if c.name == name), None)

    def metrics(self, prefix: str = "drift_") -> dict[str, float]:
        """Flat numbers for MLflow: level (0 none, 1 drift, 2 strong) and each tested check's figures."""
        out = {f"{prefix}level": float(LEVELS.index(self.level))}
        for c in self.checks:
            if c.tested:
                out[f"{prefix}{c.name}_drifted"] = float(c.drifted)
                for key in ("statistic", "p_value", "effect"):
                    if getattr(c, key) is not None:
                        out[f"{prefix}{c.name}_{key}"] = float(getattr(c, key))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level, "tested": self.tested}

    def html_section(self) -> str:
        """A self-contained <section> (inline styles); a strong drift is a red banner."""
        e = html.escape
        colour = {"none": "#1b7f3b", "drift": "#b36b00", "strong": "#b00020"}[self.level]
        banner = {"none": "No drift detected", "drift": "Drift detected",
                  "strong": "STRONG DRIFT: results on these images may be unreliable"}[self.level]
        marker = self.level if self.tested else "untested"
        if not self.tested:
            colour, banner = "#666", "Drift not tested: " + e("; ".join(dict.fromkeys(c.detail for c in self.checks)))
        rows = "".join(
            f"<tr><td>{e(c.name)}</td><td>{'yes' if c.drifted else ('no' if c.tested else 'not tested')}</td>"
            f"<td>{'' if c.p_value is None else f'{c.p_value:.3g}'}</td><td>{e(c.detail)}</td></tr>"
            for c in self.checks)
        stats = self.check("colour")
        stat_rows = "".join(
            f"<tr><td>{e(r['stat'])}</td><td>{r['train_mean']:.3g}</td><td>{r['batch_mean']:.3g}</td>"
            f"<td>{r['smd']:+.2f}</td><td>{r['ks_p']:.3g}</td><td>{'yes' if r['drifted'] else ''}</td></tr>"
            for r in (stats.rows if stats else []))
        detail = (f"<details><summary>Colour statistics</summary><table><tr><th>statistic</th><th>training mean</th>"
                  f"<th>this mean</th><th>SMD</th><th>KS p</th><th>drifted</th></tr>{stat_rows}</table></details>"
                  if stat_rows else "")
        return (f'<section class="drift drift-{self.level}" data-drift-level="{marker}">'
                f"<h2>Drift</h2>"
                f'<p style="padding:.5em;color:#fff;background:{colour};font-weight:bold">{banner}</p>'
                f"<p>{e(self.subject)}: {self.n_images} images compared with the training data of "
                f"{e(self.reference)}.</p>"
                f"<table><tr><th>test</th><th>drifted</th><th>p</th><th>detail</th></tr>{rows}</table>{detail}</section>")


def drift_report(reference_profile: dict[str, Any] | bytes | str | None, images: np.ndarray | None = None, *,
                 stats: np.ndarray | None = None, features: np.ndarray | None = None, labels: Sequence[str] | None = None,
                 label_source: str = "predicted", subject: str = "batch",
                 thresholds: DriftThresholds | None = None, seed: int = 0) -> DriftResult:
    """Compare images (uint8 [N, S, S, 3]), their pooled features [N, K] and labels with the profile.
    `stats` ([N, len(STAT_NAMES)] `image_stats` rows) stands in for `images` when those were kept
    image by image (batch scoring keeps 13 numbers per image, not its pixels).

    Any of the three may be None (that test is reported as not tested, with the reason); so may the
    profile (a bundle trained before profiles: `bundle.files.get(DATA_PROFILE_FILE)`)."""
    t = thresholds or DriftThresholds.from_settings()
    if stats is None and images is not None:
        stats = image_stats(images)
    n = next((len(x) for x in (stats, features, labels) if x is not None), 0)
    if reference_profile is None:
        why = "the model's bundle has no training-data profile (trained before drift checks)"
        return DriftResult(subject, n, "", [DriftCheck(name, False, detail=why)
                                            for name in ("colour", "features", "label_mix")], t.strong_effect)
    profile = load_profile(reference_profile)
    checks: list[DriftCheck] = []
    too_few = f"{n} images < DRIFT_MIN_IMAGES={t.min_images}" if n < t.min_images else ""
    if stats is None or too_few:
        checks.append(DriftCheck("colour", False, detail=too_few or "no images given"))
    else:
        checks.append(colour_drift(profile, np.asarray(stats, np.float64), t))
    if features is None or not profile.get("features") or too_few:
        why = too_few or ("the profile has no pooled features" if features is not None
                          else "no pooled features given (the model's bundle has no features output)")
        checks.append(DriftCheck("features", False, detail=why))
    else:
        checks.append(feature_drift(profile, features, t, seed))
    if labels is None or too_few:
        checks.append(DriftCheck("label_mix", False, detail=too_few or "no labels given"))
    else:
        checks.append(label_mix_drift(profile, labels, t, label_source))
    return DriftResult(subject, n, str(profile.get("dataset_version", "")), checks, t.strong_effect)


def profile_drift(reference_profile: dict[str, Any] | bytes | str, new_profile: dict[str, Any] | bytes | str, *,
                  subject: str = "dataset version", thresholds: DriftThresholds | None = None) -> DriftResult:
    """A new dataset version's profile against the champion's: colour statistics and the true label
    mix (pooled features are not compared: the new profile's come from another model)."""
    reference, new = load_profile(reference_profile), load_profile(new_profile)
    t = thresholds or DriftThresholds.from_settings()
    stats = np.asarray(new["colour"]["sample"], np.float64)
    if list(new["colour"]["names"]) != list(reference["colour"]["names"]):
        raise ProfileError("the two profiles have different colour statistics")
    labels = [label for label, n in new["label_mix"].items() for _ in range(int(n))]
    checks = [colour_drift(reference, stats, t) if len(stats) >= t.min_images
              else DriftCheck("colour", False, detail=f"{len(stats)} images < DRIFT_MIN_IMAGES={t.min_images}"),
              DriftCheck("features", False, detail="not compared for a dataset version (the new profile's "
                                                   "features come from the new model)"),
              label_mix_drift(reference, labels, t, source="true") if labels
              else DriftCheck("label_mix", False, detail="no labels")]
    return DriftResult(subject, int(new.get("n_images", len(stats))), str(reference.get("dataset_version", "")),
                       checks, t.strong_effect)
