"""GET /v1/model: what is being served, so a lab user (and the page) can name the model version."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from contracts.bundle import QUANTIZATION_NONE, THRESHOLD_RULE_KEY
from contracts.tta import BUNDLE_KEY
from serving import schemas
from serving.clinical import context_for
from serving.deps import ManagerDep, current_model
from serving.errors import ApiError

# The card is static HTML with inline CSS and an inline PNG: nothing else may load or run.
CARD_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", response_model=schemas.ModelInfo, responses={503: schemas.ERROR_RESPONSES[503]})
async def model_info(manager: ManagerDep):
    """The model being served: version, dataset version, test metrics, promotion time."""
    model = current_model(manager)
    meta = model.meta
    return schemas.ModelInfo(
        model=schemas.model_ref(model),
        source=model.identity.source,
        labels=model.labels,
        task=model.task,
        positive_label=model.positive_label,
        threshold=model.threshold,
        threshold_rule=meta.get(THRESHOLD_RULE_KEY),
        tta=model.tta,
        test_time_augmentation=meta.get(BUNDLE_KEY),
        image_size=model.image_size,
        metrics=dict(meta.get("metrics") or {}),
        dataset=meta.get("dataset"),
        promoted_at=model.identity.promoted_at,
        loaded_at=manager.loaded_at,
        created_at=meta.get("created_at"),
        git_commit=meta.get("git_commit"),
        signed_by=model.identity.signed_by,
        out_of_scope_detector=meta.get("ood"),
        quantization=meta.get("quantization") or {"method": QUANTIZATION_NONE},
        clinical={lab: schemas.ClinicalContext(**context_for(lab)) for lab in model.labels},
    )


@router.get("/model/card", response_class=HTMLResponse,
            responses={404: schemas.ERROR_RESPONSES[503] | {"description": "The bundle has no model card"},
                       503: schemas.ERROR_RESPONSES[503]})
async def model_card(manager: ManagerDep):
    """The served model's card (HTML, from its signed bundle): data, metrics with intervals, intended use."""
    model = current_model(manager)
    if model.card_html is None:
        raise ApiError(404, "no_model_card", "the served bundle has no model card (trained before model cards)")
    return HTMLResponse(model.card_html.decode("utf-8"), headers={"Content-Security-Policy": CARD_CSP})
