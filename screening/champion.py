"""The model a batch is scored with: the registry's `@champion`, verified as serving verifies it.

The version is resolved once per DAG run (the plan) and pinned in every chunk, so a champion
that moves mid-run cannot mix two models in one result. The bundle is downloaded through
MLflow (cached per run id, checksums verified) and then checked like serving's `load_bundle`:
Ed25519 signature of SHA256SUMS against BUNDLE_TRUSTED_PUBLIC_KEYS, bundle.json naming the
registered run and model, and every canary re-predicted within tolerance. No TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.settings import Settings


class NoChampion(RuntimeError):
    """The dataset's registered model has no @champion yet: there is nothing to score with."""


@dataclass(frozen=True)
class ChampionRef:
    model_name: str
    version: str
    run_id: str


@dataclass(frozen=True)
class ScoringModel:
    """A verified bundle ready to run; `runner` is one LiteRT interpreter (one thread at a time)."""

    ref: ChampionRef
    meta: dict[str, Any]
    runner: Any
    signed_by: str
    detector: Any = None  # contracts.ood.OodDetector; None: the bundle has no out-of-scope detector
    tta: bool = False  # probabilities averaged over the 8 views (INFERENCE_TTA, pinned in the plan)

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def positive_label(self) -> str | None:
        return self.meta.get("positive_label") if self.meta.get("task") == "binary" else None

    @property
    def crop(self) -> str:
        """The crop policy the model was trained with (serving prepares uploads with the same one)."""
        from contracts.bundle import crop_policy

        return crop_policy(self.meta)

    @property
    def threshold(self) -> float | None:
        """The threshold for the probabilities it scores with (the TTA one with `tta`), as serving's."""
        from contracts.tta import decision_threshold

        return decision_threshold(self.meta, self.tta)


def resolve_champion(dataset: str, s: Settings) -> ChampionRef:
    """The registered version holding `@champion` for the dataset; NoChampion if there is none."""
    from training.registry import CHAMPION, alias_version
    from training.tracking import mlflow_client

    name = s.model_name(dataset)
    version = alias_version(mlflow_client(s), name, CHAMPION)
    if version is None:
        raise NoChampion(f"{name} has no @{CHAMPION} yet: train and promote a model before scoring")
    return ChampionRef(name, str(version.version), str(version.run_id))


def champion_bundle(run_id: str, s: Settings):
    """The run's bundle, checksums verified exactly: from the local cache when there (a mapped task on
    a warm worker does not import MLflow), else downloaded through MLflow into it."""
    from training.gate import cached_bundle, download_bundle
    from training.tracking import mlflow_client

    return cached_bundle(run_id, s) or download_bundle(mlflow_client(s), run_id, s)


def champion_uses_tta(ref: ChampionRef, s: Settings) -> bool:
    """Whether the version scores with TTA: INFERENCE_TTA when set, else its bundle's own default
    (bundle.json is read here, and verified with the rest when a chunk loads the model)."""
    from contracts.tta import on_by_default

    if s.inference_tta is not None:
        return s.inference_tta
    return on_by_default(champion_bundle(ref.run_id, s).meta)


def load_scoring_model(ref: ChampionRef, s: Settings, tta: bool = False) -> ScoringModel:
    """Download (cached) and verify the version's bundle; BundleError names what was refused."""
    from contracts.bundle import BundleError, check_canaries, verify_signature
    from contracts.ood import bundle_detector
    from contracts.signing import parse_public_keys

    bundle = champion_bundle(ref.run_id, s)
    signed_by = verify_signature(bundle.files, parse_public_keys(s.bundle_trusted_public_keys))
    for field, wanted, reason in (("run_id", ref.run_id, "run_mismatch"),
                                  ("model_name", ref.model_name, "model_mismatch")):
        if str(bundle.meta.get(field) or "") != wanted:
            raise BundleError(reason, f"bundle.json says {field} {bundle.meta.get(field)!r}, the registry {wanted!r}")
    runner = bundle.runner(num_threads=1)
    check_canaries(bundle, runner.predict)
    return ScoringModel(ref, bundle.meta, runner, signed_by, bundle_detector(bundle.files, bundle.meta, runner), tta)
