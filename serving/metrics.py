"""Prometheus metrics of one app instance (its own registry, so apps in one process never clash),
and the ASGI middleware that counts every request by route template."""

from __future__ import annotations

import collections
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from serving.bundle import LoadedModel

# The scope key where an error handler leaves the error code it answered (see serving.errors).
ERROR_SCOPE_KEY = "hemaflow.error"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROLLING_WINDOW = 500  # latest images (predicted or refused) behind the rolling mix and refusal gauges


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "hemaflow_http_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.errors = Counter(
            "hemaflow_http_errors", "Requests answered with an error, by route and error code", ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "hemaflow_http_request_duration_seconds", "Request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.predictions = Counter(
            "hemaflow_predictions", "Images predicted, by model version and label", ["version", "label"], registry=r
        )
        self.refusals = Counter(
            "hemaflow_out_of_scope_refusals", "Images refused as out of scope (no label given), by reason",
            ["reason"], registry=r,
        )
        self.batch_size = Histogram(
            "hemaflow_inference_batch_size", "Images per interpreter invocation (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.model_info = Gauge(
            "hemaflow_model_info", "1 for the model being served", ["name", "version", "dataset_version", "source"],
            registry=r,
        )
        self.model_loaded = Gauge("hemaflow_model_loaded", "1 when a model is loaded (readiness)", registry=r)
        self.reloads = Counter(
            "hemaflow_model_reloads", "Reload attempts by result (swapped/unchanged/refused)", ["result"], registry=r
        )
        self.reload_failures = Counter(
            "hemaflow_model_reload_failures", "Refused bundles and failed reloads by reason", ["reason"], registry=r
        )
        self.rolling_share = Gauge(
            "hemaflow_rolling_prediction_share", f"Share of each predicted label among the last {ROLLING_WINDOW} "
            "predicted images (a drifting mix shows here first)", ["label"], registry=r,
        )
        self.rolling_refusal_rate = Gauge(
            "hemaflow_rolling_refusal_rate", f"Share of refused images (unreadable, bad size) among the last "
            f"{ROLLING_WINDOW} images", registry=r,
        )
        self._window: deque[str | None] = deque(maxlen=ROLLING_WINDOW)
        self._window_lock = threading.Lock()
        self._share_labels: set[str] = set()

    def observe_image(self, label: str | None) -> None:
        """One image's outcome (its predicted label, or None when it was refused) into the rolling gauges."""
        with self._window_lock:
            self._window.append(label)
            counts = collections.Counter(self._window)
            refused = counts.pop(None, 0)
            predicted = sum(counts.values())
            self.rolling_refusal_rate.set(refused / len(self._window))
            self._share_labels |= set(counts)  # a label gone from the window drops to 0, not stale
            for known in self._share_labels:
                self.rolling_share.labels(label=known).set(counts.get(known, 0) / predicted if predicted else 0.0)

    def set_model(self, model: LoadedModel, old: LoadedModel | None) -> None:
        if old is not None:
            i = old.identity
            try:
                self.model_info.remove(i.name, i.version, i.dataset_version, i.source)
            except KeyError:
                pass
        i = model.identity
        self.model_info.labels(i.name, i.version, i.dataset_version, i.source).set(1)
        self.model_loaded.set(1)


class MetricsMiddleware:
    """Pure ASGI middleware: requests, errors and latency by route template and status.

    Route templates (not raw paths) keep label cardinality bounded; the error code comes from
    ERROR_SCOPE_KEY, set by the error handlers, else the status.
    """

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static") else "unmatched")
            code = status["code"]
            self.metrics.requests.labels(route=path, method=scope["method"], status=str(code)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - start)
            if code >= 400:
                self.metrics.errors.labels(route=path, code=scope.get(ERROR_SCOPE_KEY, str(code))).inc()
