"""Pydantic request/response schemas of the versioned API (they are the OpenAPI documentation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from serving.bundle import LoadedModel


class ModelRef(BaseModel):
    name: str = Field(description="Registered model name, e.g. hemaflow-leukemia")
    version: str = Field(description="Registry version, or local-<sha256 prefix> for a local bundle")
    dataset_version: str
    run_id: str = ""


def model_ref(model: LoadedModel) -> ModelRef:
    """The identity every prediction and /v1/model answer names."""
    i = model.identity
    return ModelRef(name=i.name, version=i.version, dataset_version=i.dataset_version, run_id=i.run_id)


class ClinicalContext(BaseModel):
    label: str
    title: str
    what: str = Field(description="What the cell or finding is")
    normal_share: str | None = Field(None, description="Normal share of white cells, where that applies")
    increase: str = Field(description="What an increase can mean")
    note: str = Field(description="Screening aid, not a diagnosis")


class Explanation(BaseModel):
    label: str = Field(description="The class the heatmap explains (the predicted one)")
    method: str = "grad-cam"
    image_size: int
    overlay_png_base64: str = Field(description="Jet-coloured Grad-CAM blended over the resized input, PNG")
    input_png_base64: str = Field(description="The resized model input itself, PNG (for the overlay toggle)")


OUT_OF_SCOPE_MESSAGE = "This image does not look like what the model was trained on"


class Scope(BaseModel):
    """The out-of-scope check of one image (internal; its fields are copied into Prediction)."""

    in_scope: bool | None
    reason: str | None = None
    detail: str | None = None
    refused: bool = False


class Prediction(BaseModel):
    filename: str | None = None
    in_scope: bool | None = Field(
        None, description="false: the bundle's out-of-scope detector says the image does not look like what the "
        "model was trained on; with SERVING_REFUSE_OUT_OF_SCOPE (default) the answer then has no label, "
        "probabilities or clinical context. null: the bundle has no detector (see scope_detail)")
    refusal_reason: str | None = Field(
        None, description="When in_scope is false: image_statistics (colours/texture unlike the training images, "
        "e.g. flat, noise, text) or features (the network's features far from every trained class)")
    scope_detail: str | None = Field(None, description="The out-of-scope verdict in words, or 'no detector: ...'")
    label: str | None = Field(None, description="Predicted class (binary tasks apply the bundle threshold); "
                              "null when the image was refused as out of scope")
    task_label: str | None = Field(None, description="Task-level answer, e.g. normal / abnormal")
    confidence: float | None = Field(None, description="Probability of the predicted class")
    probabilities: dict[str, float] | None = Field(None, description="Probability of every class, in model order")
    threshold: float | None = Field(None, description="Binary tasks: P(positive) >= threshold => positive")
    positive_label: str | None = None
    model: ModelRef
    processing_ms: float = Field(description="Server time for this request (decode, model, response)")
    clinical: ClinicalContext | None = None
    explanation: Explanation | None = None


class BatchItemError(BaseModel):
    filename: str | None = None
    error: str
    detail: str


class BatchPrediction(BaseModel):
    results: list[Prediction | BatchItemError]
    model: ModelRef
    processing_ms: float


class ModelInfo(BaseModel):
    model: ModelRef
    source: str = Field(description="registry (follows @champion) or local (SERVING_BUNDLE_PATH)")
    labels: list[str]
    task: str
    positive_label: str | None
    threshold: float | None = Field(description="Binary tasks: the threshold answers use (the TTA one with tta)")
    threshold_rule: dict[str, Any] | None = Field(
        None, description="Binary tasks: how training read the threshold off validation: {rule: validation | "
        "conformal | quantile, target_sensitivity} (null: multiclass, or a bundle from before it was recorded)")
    tta: bool = Field(False, description="Answers average the 8 flips / 90-degree rotations (INFERENCE_TTA "
                      "when set, else the dataset spec's inference_tta recorded in the bundle)")
    test_time_augmentation: dict[str, Any] | None = Field(
        None, description="bundle.json `tta`: the TTA threshold and its validation / test figures (null: none)")
    image_size: int
    metrics: dict[str, Any]
    dataset: str | None = None
    promoted_at: str | None = None
    loaded_at: str | None = None
    created_at: str | None = None
    git_commit: str | None = None
    signed_by: str | None = Field(None, description="id of the pinned public key that verified the bundle")
    out_of_scope_detector: dict[str, Any] | None = Field(
        None, description="The bundle's out-of-scope detector: method, thresholds, validation figures (null: none)")
    quantization: dict[str, Any] = Field(
        description="How model.tflite stores its weights and how it agreed with the float model on validation")
    clinical: dict[str, ClinicalContext]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    source: str
    last_error: str | None = None
    last_check_at: str | None = None


class ReloadResponse(BaseModel):
    changed: bool
    ok: bool
    version: str | None
    reason: str


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. too_large, not_an_image, truncated")
    detail: str = Field(description="What is wrong, in words")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "API key missing"},
    403: {"model": ErrorBody, "description": "API key wrong"},
    413: {"model": ErrorBody, "description": "Upload over SERVING_MAX_UPLOAD_BYTES (or too many files)"},
    415: {"model": ErrorBody, "description": "Not an image, or an unsupported format"},
    422: {"model": ErrorBody, "description": "Empty, truncated, corrupt, bomb or unusable image"},
    503: {"model": ErrorBody, "description": "No model loaded yet"},
}
