"""Which model is served, and how a new one replaces it without dropping a request.

`ModelManager.current` is a single reference: a request reads it once and keeps that
`LoadedModel` until it has answered, so an in-flight request finishes on the model it
started with while new requests see the new one (the swap is one attribute assignment,
atomic under the GIL). Reloads are serialised by a lock; a candidate is fully verified
(signature under a pinned key, checksums, run and model names, canaries) before the swap, and
a failure leaves the current model in place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from datetime import UTC, datetime

from contracts.bundle import BundleError, read_local_bundle, verify_signature
from contracts.settings import Settings
from contracts.signing import parse_public_keys
from serving import registry
from serving.bundle import LoadedModel, load_bundle
from serving.metrics import ServingMetrics
from serving.runners import cpu_cores, default_threads
from serving.workers import generation_from_env

log = logging.getLogger("serving.manager")

WORKER_SYNC = "worker-sync"  # reload trigger: another worker swapped its model


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    version: str | None
    reason: str
    ok: bool


class ModelManager:
    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self.loaded_at: str | None = None
        self.last_error: str | None = None
        self.last_check_at: str | None = None
        self._reload_lock = threading.Lock()
        # Several workers (serving.workers): the generation of the model swapped in anywhere.
        self.generation = generation_from_env()
        self._catch_up_lock: asyncio.Lock | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Pinned at start-up: whatever MLflow says, only bundles signed by these keys are served.
        self.trusted_keys = parse_public_keys(settings.bundle_trusted_public_keys)
        self._mlflow_auth = registry.basic_auth(settings.serving_mlflow_username,
                                                settings.serving_mlflow_password.get_secret_value())
        if not self.trusted_keys:
            log.warning("BUNDLE_TRUSTED_PUBLIC_KEYS is empty: every bundle will be refused (unknown_key)")
        else:
            log.info("trusting bundles signed by key(s) %s", ", ".join(sorted(self.trusted_keys)))

    # --- sources ---------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return "local" if self.settings.serving_bundle_path else "registry"

    def _load_local(self) -> LoadedModel:
        path = self.settings.serving_bundle_path
        assert path is not None
        files = read_local_bundle(path)
        return load_bundle(files, trusted_keys=self.trusted_keys, source="local", **self._interpreters())

    def _load_registry(self, force: bool) -> LoadedModel | None:
        s = self.settings
        ref = registry.resolve_champion(s.mlflow_tracking_uri, s.model_name(), auth=self._mlflow_auth)
        cur = self.current
        if not force and cur is not None and cur.identity.source == "registry" and cur.identity.version == ref.version:
            return None  # already serving the champion
        files = registry.download_bundle(s.mlflow_tracking_uri, ref.run_id, auth=self._mlflow_auth,
                                         check_sums=lambda sums: verify_signature(sums, self.trusted_keys))
        return load_bundle(
            files, trusted_keys=self.trusted_keys, version=ref.version, source="registry",
            promoted_at=ref.promoted_at, **self._interpreters(),
            expect={"run_id": ref.run_id, "model_name": ref.name},
        )

    def _interpreters(self) -> dict[str, Any]:
        """load_bundle's interpreters (one per inference thread) and the threads of each: the cores
        left to it, at most 4 (1 by default: one single-threaded interpreter per core), plus a
        multi-threaded one for a request that runs alone (lowest latency when the server is idle);
        and whether answers average the TTA views (the threshold follows)."""
        s = self.settings
        n = default_threads(s.serving_inference_threads, s.serving_workers)
        share = max(1, cpu_cores() // s.serving_workers)  # this worker's cores
        return {"interpreters": n, "num_threads": max(1, min(4, share // n)),
                "solo_threads": min(4, share) if n > 1 and share > 1 else 0, "tta": s.inference_tta}

    # --- reload ----------------------------------------------------------------------------
    def reload(self, *, force: bool = False, trigger: str = "admin") -> ReloadResult:
        """Load the configured source; swap only after it passed every check."""
        with self._reload_lock:
            self.last_check_at = _now()
            old = self.current
            try:
                if self.source == "local":
                    model = self._load_local()
                    if not force and old is not None and old.identity.version == model.identity.version:
                        model = None
                else:
                    model = self._load_registry(force)
            except BundleError as exc:
                return self._refused(exc.reason, exc.detail, trigger)
            except registry.NoChampion as exc:
                return self._refused("no_champion", str(exc), trigger)
            except registry.RegistryUnauthorized as exc:
                return self._refused("registry_auth", str(exc), trigger)
            except registry.RegistryUnavailable as exc:
                return self._refused("registry_unavailable", str(exc), trigger)
            except Exception as exc:  # never let a reload take the server down
                log.exception("unexpected error while loading a bundle")
                return self._refused("load_error", f"{type(exc).__name__}: {exc}", trigger)
            if model is None:
                assert old is not None
                self.metrics.reloads.labels(result="unchanged").inc()
                return ReloadResult(False, old.identity.version, "already serving this version", True)
            self.current = model  # the atomic swap
            if self.generation is not None and trigger not in ("startup", WORKER_SYNC):
                self.generation.publish()  # the other workers reload before their next request
            self.loaded_at = _now()
            self.last_error = None
            self.metrics.set_model(model, old)
            self.metrics.reloads.labels(result="swapped").inc()
            log.info(
                "serving %s version %s (dataset %s) [%s], was %s",
                model.identity.name, model.identity.version, model.identity.dataset_version, trigger,
                old.identity.version if old else "none",
            )
            return ReloadResult(True, model.identity.version, "loaded", True)

    async def catch_up(self) -> None:
        """With several workers: if another worker swapped its model since, reload here first
        (requests arriving meanwhile wait for it). One `stat` when nothing changed."""
        gen = self.generation.pending() if self.generation is not None else None
        if gen is None:
            return
        if self._catch_up_lock is None:
            self._catch_up_lock = asyncio.Lock()
        async with self._catch_up_lock:
            if self.generation.seen >= gen:
                return
            await asyncio.to_thread(self.reload, trigger=WORKER_SYNC)
            self.generation.seen = max(self.generation.seen, gen)

    def _refused(self, reason: str, detail: str, trigger: str) -> ReloadResult:
        self.last_error = f"{reason}: {detail}"
        self.metrics.reloads.labels(result="refused").inc()
        self.metrics.reload_failures.labels(reason=reason).inc()
        cur = self.current
        level = logging.INFO if reason in ("no_champion",) and cur is None else logging.WARNING
        log.log(
            level, "model reload refused (%s, %s): %s; still serving %s",
            reason, trigger, detail, cur.identity.version if cur else "nothing",
        )
        return ReloadResult(False, cur.identity.version if cur else None, f"{reason}: {detail}", False)

    # --- registry poller -------------------------------------------------------------------
    def start_polling(self) -> None:
        interval = self.settings.serving_poll_interval_s
        if interval <= 0 or self.source != "registry" or self._poller is not None:
            return
        self._poller = threading.Thread(target=self._poll_loop, args=(interval,), name="champion-poller", daemon=True)
        self._poller.start()

    def _poll_loop(self, interval: float) -> None:
        # Retry sooner while nothing is loaded, so a fresh container becomes ready quickly.
        while not self._stop.wait(min(interval, 2.0) if self.current is None else interval):
            self.reload(trigger="poll")

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout_s)
            self._poller = None


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def monotonic_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
