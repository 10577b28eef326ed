"""CLI subcommands of the pipeline stages: upload, submit (a batch to score), ingest, validate, preprocess, run.

Each prints a concise human summary; progress bars go to stderr.
Each command imports its stage inside: `python -m pipeline stack up` never loads PIL or GX.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contracts.settings import get_settings


def _dataset(args: argparse.Namespace) -> str:
    return args.dataset or get_settings().dataset


def _print_ingest(r: dict) -> None:
    state = "unchanged: reused the previous manifest" if r["reused"] else "new manifest written"
    print(f"ingest   {r['total']} objects ({r['new']} new, {r['changed']} changed, {r['deleted']} deleted, "
          f"{r['unchanged']} unchanged; {r['downloaded_bytes'] / 1e6:.1f} MB downloaded) - {state}")
    print(f"         manifest s3://.../{r['manifest_key']}")
    if r["unassigned"]:
        print(f"         WARNING {r['unassigned']} objects are not under a class folder of the spec "
              f"(ignored), e.g. {r['unassigned_keys'][:3]}")
    if r["errors"]:
        print(f"         {r['errors']} unreadable files recorded (validation will quarantine them)")
    if r["deleted"]:
        print(f"         deleted since the previous manifest: {r['deleted_keys'][:5]}")


def _print_validate(r: dict) -> None:
    reused = " (same manifest and checks: saved result reused)" if r.get("reused") else ""
    print(f"validate {r['kept']} images kept, {r['quarantined']} quarantined "
          f"(bad fraction {r['bad_fraction']:.2%}), {r['duplicates_dropped']} byte-identical duplicates "
          f"dropped{reused}")
    print(f"         summary s3://.../{r['summary_key'].rsplit('/', 1)[0]}/summary.md")


def _print_preprocess(r: dict) -> None:
    print(f"preprocess {r['message']}")


def _upload(args: argparse.Namespace) -> int:
    from pipeline.upload import upload_tree

    r = upload_tree(Path(args.dir), _dataset(args), show_progress=True)
    print(f"upload   {r['uploaded']} uploaded ({r['bytes'] / 1e6:.1f} MB), {r['skipped']} already there "
          f"(same content) -> {r['prefix']}")
    if r["ignored"]:
        print(f"         ignored (not class folders of the spec): {r['ignored']}")
    print(f"airflow  {r['asset_event']['message']}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from screening.batches import submit_folder

    r = submit_folder(Path(args.dir), _dataset(args), args.batch, show_progress=True)
    print(f"submit   batch {r['batch_id']}: {r['uploaded']} uploaded ({r['bytes'] / 1e6:.1f} MB), {r['skipped']} "
          f"already there (same content) -> {r['prefix']}")
    print(f"airflow  {r['asset_event']['message']}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    _print_ingest(ingest(_dataset(args), show_progress=True).to_dict())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipeline.manifests import latest_key
    from pipeline.storage import get_json_or_none, s3_client
    from pipeline.validate import validate

    dataset = _dataset(args)
    manifest_key = args.manifest
    if not manifest_key:
        s = get_settings()
        pointer = get_json_or_none(s3_client(s), s.s3_bucket, latest_key(dataset))
        if not pointer:
            raise SystemExit(f"no manifest for {dataset!r} yet: run 'python -m pipeline ingest' first")
        manifest_key = pointer["manifest_key"]
    _print_validate(validate(manifest_key, dataset, show_progress=True).to_dict())
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from pipeline.preprocess import preprocess

    if not args.validated:
        raise SystemExit("preprocess needs --validated KEY (printed by 'validate'), or use 'run'")
    _print_preprocess(preprocess(args.validated, _dataset(args), show_progress=True).to_dict())
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.run import run_pipeline

    r = run_pipeline(_dataset(args), show_progress=True)
    _print_ingest(r["ingest"])
    _print_validate(r["validate"])
    _print_preprocess(r["preprocess"])
    t = r["timings"]
    print(f"done     {r['dataset']} version {r['preprocess']['dataset_version']} in {t['total_s']:.1f}s "
          f"(ingest {t['ingest_s']:.1f}s, validate {t['validate_s']:.1f}s, preprocess {t['preprocess_s']:.1f}s)")
    return 0


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """Register the stage subcommands on `python -m pipeline`."""
    def _add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dataset", default=None, help="dataset spec name (default: the DATASET setting)")
        p.set_defaults(func=func)
        return p

    p = _add("upload", _upload, "upload a folder-per-class tree to raw/<dataset>/ (skips identical objects)")
    p.add_argument("dir", help="folder with one sub-folder per class")
    p = _add("submit", _submit, "upload a folder of images to score as one batch to inbox/<dataset>/<batch>/")
    p.add_argument("dir", help="folder of images (flat or nested)")
    p.add_argument("--batch", default=None, help="batch id (default: a UTC timestamp)")
    _add("ingest", _ingest, "list raw/<dataset>/, download new/changed objects, write a manifest")
    p = _add("validate", _validate, "check images and the dataset (Great Expectations), quarantine failures")
    p.add_argument("--manifest", default=None, help="manifest key (default: the latest one)")
    p = _add("preprocess", _preprocess, "resize, split and write TFRecord shards for a validated manifest")
    p.add_argument("--validated", default=None, help="validated.jsonl key printed by 'validate'")
    _add("run", _run, "ingest -> validate -> preprocess in one go")
