"""`python -m serving [--host H] [--port P] [--bundle DIR]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    from contracts.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--host", help="default: SERVING_HOST")
    parser.add_argument("--port", type=int, help="default: SERVING_PORT")
    parser.add_argument("--bundle", help="serve this local bundle folder (sets SERVING_BUNDLE_PATH)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.bundle:
        os.environ["SERVING_BUNDLE_PATH"] = args.bundle
    settings = get_settings()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from serving.workers import SYNC_DIR_ENV, make_sync_dir, remove_sync_dir

    sync_dir = make_sync_dir() if settings.serving_workers > 1 else None
    if sync_dir is not None:
        os.environ[SYNC_DIR_ENV] = str(sync_dir)  # the workers inherit it
    try:
        _run(uvicorn, args, settings)
    finally:
        if sync_dir is not None:
            remove_sync_dir(sync_dir)


def _run(uvicorn, args: argparse.Namespace, settings) -> None:
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=args.host or settings.serving_host,
        port=args.port or settings.serving_port,
        log_level=args.log_level,
        # Access logs carry paths and status only: never bodies, so never images.
        access_log=False,
        timeout_graceful_shutdown=10,
        workers=settings.serving_workers,
    )


if __name__ == "__main__":
    main()
