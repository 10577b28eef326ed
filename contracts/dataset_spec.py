"""Dataset specs: a folder-per-class dataset is described by one TOML file.

A new dataset needs nothing but a new `pipeline/specs/<name>.toml`; files whose name
starts with `_` (the documented template) are not datasets.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.imaging import CROP_POLICIES
from contracts.settings import Settings, StainNormalisation, ThresholdRule, get_settings

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,127}$")


class SpecError(ValueError):
    """A dataset spec is missing or malformed."""


class SpecTraining(BaseModel):
    """A spec's optional [training] table: settings that differ per dataset (what a set needs to
    converge within the CPU budget). They replace the global settings for that dataset's training runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train_input_size: int | None = Field(None, ge=16, le=1024)
    model_width: int | None = Field(None, ge=4, le=256)
    model_ensemble_size: int | None = Field(None, ge=1, le=4)
    epochs: int | None = Field(None, ge=1)
    model_stain_normalisation: StainNormalisation | None = None
    # The sensitivity the decision threshold is chosen for on validation (binary datasets).
    target_sensitivity: float | None = Field(None, gt=0, le=1)
    threshold_rule: ThresholdRule | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    s3_prefix: str
    classes: dict[str, str]  # class folder -> task label
    positive_label: str | None = None
    source: Path | None = field(default=None, compare=False)
    credits: str = ""  # who made the data and how to cite it (shown on the model card)
    # How a non-square image becomes the square model input (contracts.imaging.CROP_POLICIES).
    crop: str = "center_crop"
    # [training] overrides of the global settings for this dataset (SpecTraining), unset ones omitted.
    training: dict[str, int | str] = field(default_factory=dict)
    # Whether its models answer with test-time augmentation when INFERENCE_TTA is unset (contracts.tta).
    inference_tta: bool = True

    @property
    def class_folders(self) -> list[str]:
        return sorted(self.classes)

    @property
    def labels(self) -> list[str]:
        """Task labels in a stable order: the model's output index order."""
        return sorted(set(self.classes.values()))

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @property
    def is_binary(self) -> bool:
        return len(self.labels) == 2

    def label_of(self, class_folder: str) -> str:
        try:
            return self.classes[class_folder]
        except KeyError:
            raise SpecError(f"class folder {class_folder!r} is not in dataset spec {self.name!r}") from None

    def key_for(self, class_folder: str, filename: str) -> str:
        return f"{self.s3_prefix}{class_folder}/{filename}"

    def class_of_key(self, key: str) -> str | None:
        """The class folder of an S3 key under this spec's prefix, or None if it has none."""
        if not key.startswith(self.s3_prefix):
            return None
        rest = key[len(self.s3_prefix):]
        if "/" not in rest:
            return None
        return rest.split("/", 1)[0]


def parse_spec(text: str, source: Path | None = None) -> DatasetSpec:
    where = f" ({source})" if source else ""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"dataset spec is not valid TOML{where}: {exc}") from exc
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(f"dataset spec needs a lower-case 'name' ([a-z0-9_-]){where}")
    classes = raw.get("classes")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise SpecError(f"dataset spec {name!r} needs a [classes] table with at least two folders{where}")
    for folder, label in classes.items():
        if not _FOLDER_RE.match(folder) or not isinstance(label, str) or not label:
            raise SpecError(f"dataset spec {name!r}: bad class entry {folder!r} = {label!r}{where}")
    labels = set(classes.values())
    if len(labels) < 2:
        raise SpecError(f"dataset spec {name!r} maps every folder to one label{where}")
    prefix = raw.get("s3_prefix", f"raw/{name}/")
    if not isinstance(prefix, str) or prefix.startswith("/") or not prefix.endswith("/"):
        raise SpecError(f"dataset spec {name!r}: s3_prefix must be relative and end with '/'{where}")
    positive = raw.get("positive_label")
    if positive is not None and positive not in labels:
        raise SpecError(f"dataset spec {name!r}: positive_label {positive!r} is not a label{where}")
    if positive is not None and len(labels) != 2:
        raise SpecError(f"dataset spec {name!r}: positive_label only applies to two-label tasks{where}")
    crop = raw.get("crop", "center_crop")
    if crop not in CROP_POLICIES:
        raise SpecError(f"dataset spec {name!r}: crop must be one of {', '.join(CROP_POLICIES)}, "
                        f"not {crop!r}{where}")
    inference_tta = raw.get("inference_tta", True)
    if not isinstance(inference_tta, bool):
        raise SpecError(f"dataset spec {name!r}: inference_tta must be true or false, not {inference_tta!r}{where}")
    try:
        training = SpecTraining.model_validate(raw.get("training", {})).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'training'}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"dataset spec {name!r}: bad [training] table ({problems}){where}") from None
    return DatasetSpec(
        name=name,
        description=str(raw.get("description", "")),
        s3_prefix=prefix,
        classes=dict(classes),
        positive_label=positive,
        source=source,
        credits=str(raw.get("credits", "")),
        crop=crop,
        training=training,
        inference_tta=inference_tta,
    )


def training_settings(settings: Settings, dataset: str) -> Settings:
    """`settings` with the dataset spec's [training] table applied (unchanged when the dataset has no spec)."""
    try:
        spec = load_spec(dataset, settings.dataset_specs_dir)
    except SpecError:
        return settings
    return settings.model_copy(update=spec.training) if spec.training else settings


def inference_tta_default(settings: Settings, dataset: str) -> bool:
    """The dataset spec's `inference_tta` (on when the dataset has no spec): what training records
    in the bundle as its models' TTA default."""
    try:
        return load_spec(dataset, settings.dataset_specs_dir).inference_tta
    except SpecError:
        return True


def spec_paths(specs_dir: Path | None = None) -> list[Path]:
    directory = specs_dir or get_settings().dataset_specs_dir
    return sorted(p for p in directory.glob("*.toml") if not p.name.startswith("_"))


def load_spec(name: str | None = None, specs_dir: Path | None = None) -> DatasetSpec:
    """Load the spec named `name` (default: the `DATASET` setting)."""
    settings = get_settings()
    name = name or settings.dataset
    directory = specs_dir or settings.dataset_specs_dir
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in spec_paths(directory)) or "none"
        raise SpecError(f"no dataset spec {name!r} in {directory} (known: {known})")
    spec = parse_spec(path.read_text(encoding="utf-8"), source=path)
    if spec.name != name:
        raise SpecError(f"{path} declares name {spec.name!r}; the file name must match")
    return spec


def list_specs(specs_dir: Path | None = None) -> list[DatasetSpec]:
    return [load_spec(p.stem, specs_dir) for p in spec_paths(specs_dir)]
