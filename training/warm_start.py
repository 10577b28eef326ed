"""Warm start (WARM_START / DAG param `warm_start`): a candidate starts from the champion's weights.

Only when the champion was trained for the same labels (same order), on a dataset version with the
same split parameters (else images it trained on may sit in the candidate's test split, and the gate
would judge a candidate that has seen its test images; a champion that predates the `split_params`
run param counts as different), and the same architecture
(model width, depth, stain normalisation and ensemble size in its run params, and then the same
weight shapes as the new network), and never for an ensemble (MODEL_ENSEMBLE_SIZE > 1), whose
members differ by their seeds;
otherwise the candidate trains from scratch and the reason is recorded. The weights come from
the Keras model each training run registers (`training.tracking.log_model`: an MLflow
`tensorflow` flavour model of the served twin, whose weight list equals the training network's,
see `training.model.served_twin`). The gate is unchanged: a warm-started candidate is judged
exactly like a cold one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.processed import DatasetMeta
from contracts.settings import Settings

TAG_WARM_START = "warm_start"  # run tag: why the candidate did or did not start warm
PARAM_WARM_STARTED_FROM = "warm_started_from"  # run param: champion version, or "none"
# The stain normalisation has no weights, but weights learnt on un-normalised input do not fit it.
ARCHITECTURE_PARAMS = ("model_width", "model_depth", "model_stain_normalisation", "model_ensemble_size")
# The value a champion logged before a parameter existed: its model was built that way.
ARCHITECTURE_PARAM_DEFAULTS = {"model_ensemble_size": "1"}
# A warm start fine-tunes: a fresh Adam at the full LEARNING_RATE moves every weight by about the
# learning rate in its first steps and throws the champion's solution away (benchmarks/incremental.py).
WARM_START_LR_FACTOR = 0.1


@dataclass(frozen=True)
class WarmStart:
    weights: list[Any] | None  # None: train from scratch
    from_version: str | None
    reason: str


def _cold(reason: str) -> WarmStart:
    return WarmStart(None, None, reason)


def mismatch(champion_params: dict[str, str], s: Settings, meta: DatasetMeta) -> str | None:
    """Why the champion's run cannot seed this candidate (labels, splits or architecture), or None."""
    from training.tracking import PARAM_SPLIT_PARAMS, split_params_text

    if champion_params.get("labels") != ",".join(meta.labels):
        return f"labels differ (champion {champion_params.get('labels')!r}, candidate {','.join(meta.labels)!r})"
    if champion_params.get(PARAM_SPLIT_PARAMS) != split_params_text(meta):
        return (f"split parameters differ (champion {champion_params.get(PARAM_SPLIT_PARAMS, 'not recorded')}, "
                f"candidate {split_params_text(meta)})")
    for key in ARCHITECTURE_PARAMS:
        champion = champion_params.get(key, ARCHITECTURE_PARAM_DEFAULTS.get(key))
        if champion != str(getattr(s, key)):
            return f"architecture differs ({key}: champion {champion}, candidate {getattr(s, key)})"
    return None


def network_shapes(s: Settings, meta: DatasetMeta) -> list[tuple[int, ...]]:
    """Weight shapes of the network this candidate would train (built once, cheaply, to compare)."""
    from training.model import build_model

    net = build_model(len(meta.labels), s.train_input_size, s.train_input_size, s.model_width, s.model_depth,
                      seed=s.seed)
    return [tuple(w.shape) for w in net.get_weights()]


def champion_weights(s: Settings, meta: DatasetMeta, shapes: list[tuple[int, ...]]) -> WarmStart:
    """The champion's weights if WARM_START is on and they fit a network with these weight `shapes`."""
    if not s.warm_start:
        return _cold("warm start off")
    if s.model_ensemble_size > 1:
        return _cold(f"MODEL_ENSEMBLE_SIZE={s.model_ensemble_size}: an ensemble's members train from scratch "
                     "(each from its own seed)")
    import mlflow

    from training.registry import CHAMPION, alias_version
    from training.tracking import mlflow_client

    client = mlflow_client(s)
    name = s.model_name(meta.dataset)
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return _cold(f"no {name}@{CHAMPION} yet: trained from scratch")
    why = mismatch(client.get_run(champion.run_id).data.params, s, meta)
    if why:
        return _cold(f"{why}: trained from scratch")
    model = mlflow.tensorflow.load_model(f"models:/{name}/{champion.version}")
    weights = model.get_weights()
    if [tuple(w.shape) for w in weights] != [tuple(sh) for sh in shapes]:
        return _cold(f"champion v{champion.version} has other weight shapes (model code changed): trained from scratch")
    return WarmStart(weights, str(champion.version), f"initialised from {name} v{champion.version} (champion)")


def fit_settings(s: Settings, warm: WarmStart) -> Settings:
    """The settings the fit uses: a warm start fine-tunes at LEARNING_RATE x WARM_START_LR_FACTOR."""
    if warm.weights is None:
        return s
    return s.model_copy(update={"learning_rate": s.learning_rate * WARM_START_LR_FACTOR})


def log_warm_start(s: Settings, meta: DatasetMeta) -> WarmStart:
    """Decide the warm start inside the active MLflow run and record it (param + tag), also when cold."""
    import logging

    import mlflow

    warm = champion_weights(s, meta, network_shapes(s, meta)) if s.warm_start else _cold("warm start off")
    mlflow.log_param(PARAM_WARM_STARTED_FROM, warm.from_version or "none")
    mlflow.set_tag(TAG_WARM_START, warm.reason)
    if warm.weights is not None:
        mlflow.log_param("warm_start_learning_rate", fit_settings(s, warm).learning_rate)
    logging.getLogger(__name__).info("warm start: %s", warm.reason)
    return warm
