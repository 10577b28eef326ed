"""Prometheus metrics of one app instance (its own registry, so apps in one process never clash)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from serving.bundle import LoadedModel

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
