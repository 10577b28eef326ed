"""The demo's images (`python -m scripts.demo`): where they come from, and the held-back batch."""

from __future__ import annotations

import os
from pathlib import Path

from contracts.settings import PROJECT_ROOT, Settings
from scripts.demo_airflow import DemoError

SHARED_DEMO_DATA = Path(os.environ.get("HEMAFLOW_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
DEMO_HOLD_BACK = 40  # images of the demo data never uploaded to raw/: scored as a batch at the end


def resolve_data_dir(dataset: str) -> Path | None:
    """DATA_DIR if given, else ../shared/data/<dataset> when it exists, else None."""
    given = os.environ.get("DATA_DIR")
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            raise DemoError(f"DATA_DIR={given} is not a folder")
        return path
    shared = SHARED_DEMO_DATA / dataset
    return shared if shared.is_dir() else None


def no_data_help(dataset: str) -> str:
    from contracts.dataset_spec import load_spec

    spec = load_spec(dataset)
    folders = "\n".join(f"    {folder}/   ({label})" for folder, label in sorted(spec.classes.items()))
    return (
        f"No demo images found: DATA_DIR is not set and {SHARED_DEMO_DATA / dataset} does not exist.\n"
        f"Point the demo at a folder-per-class dataset, one sub-folder per class of spec '{dataset}':\n"
        f"  DATA_DIR/\n{folders}\n"
        f"then run:  make demo DATA_DIR=/path/to/images\n"
        f"(another dataset: DATASET=<name> with pipeline/specs/<name>.toml; see pipeline/specs/_template.toml)"
    )


def hold_back(settings: Settings, data_dir: Path, dataset: str, count: int = DEMO_HOLD_BACK) -> tuple[Path, Path]:
    """Split the demo data into a training tree and a held-back batch, as two folders of symlinks
    under HEMAFLOW_HOME/demo (rebuilt each time): the last files of each class folder, taken in
    turn, form the batch (flat, so no class name gives the answer away). Returns (train, batch)."""
    import shutil

    from contracts.dataset_spec import load_spec

    spec = load_spec(dataset)
    per_class = {f: sorted(p for p in (data_dir / f).rglob("*") if p.is_file() and not p.name.startswith("."))
                 for f in spec.class_folders if (data_dir / f).is_dir()}
    held: list[Path] = []
    while len(held) < count and any(len(files) > 1 for files in per_class.values()):
        for files in per_class.values():
            if len(held) < count and len(files) > 1:
                held.append(files.pop())
    home = settings.hemaflow_home / "demo"
    train, batch = home / "train-tree", home / "holdout-batch"
    for folder in (train, batch):
        shutil.rmtree(folder, ignore_errors=True)
    for folder, files in per_class.items():
        for path in files:
            link = train / folder / path.relative_to(data_dir / folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    batch.mkdir(parents=True)
    for i, path in enumerate(held):
        (batch / f"{i:03d}-{path.name}").symlink_to(path)
    return train, batch
