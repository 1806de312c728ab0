"""The gateway's Prometheus series. Workers report their queue and invoke times in each reply,
so one scrape of the gateway sees the data plane's numbers, workers included.

Labels stay bounded: `origin` and `model` come from the directory (a name that is not served is
counted under `model=""`), `accelerator` is cpu, gpu or npu, `code` an HTTP status.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Sub-millisecond to tens of seconds: the data path's budget is about a millisecond.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
SIZE_BUCKETS = tuple(float(4**i) for i in range(4, 15))  # 256 B .. 256 MiB


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["origin", "model"]
        self.requests = Counter(
            "modelloader_requests",
            "Inference requests by HTTP status code.",
            [*labels, "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "modelloader_request_duration_seconds",
            "Inference request time in the gateway.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "modelloader_queue_duration_seconds",
            "Time a request waited for its interpreter.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "modelloader_inference_duration_seconds",
            "Interpreter invoke time per request.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "modelloader_request_bytes",
            "Inference request body size.",
            labels,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        # Utilisation is rate() of this: seconds the model's accelerator spent invoking it per
        # second. CPU, GPU and NPU alike; summed per origin it is the origin's share.
        self.accelerator_busy = Counter(
            "modelloader_accelerator_busy_seconds",
            "Interpreter invoke time, as reported by the workers, by the accelerator that ran it.",
            [*labels, "accelerator"],
            registry=registry,
        )
        self.response_bytes = Histogram(
            "modelloader_response_bytes",
            "Inference response body size.",
            labels,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )

        self.unknown = ModelSeries(self, "", "", "cpu")
        self._series: dict[tuple[str, str, str], ModelSeries] = {}

    def series(self, origin: str, model: str, accelerator: str = "cpu") -> ModelSeries:
        """The children of every series for one (origin, model), made once: `labels()` takes
        a lock and checks its arguments on every call, seven times per request."""
        key = (origin, model, accelerator)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = ModelSeries(self, origin, model, accelerator)
        return found


class ModelSeries:
    __slots__ = (
        "_codes",
        "_labels",
        "accelerator_busy",
        "inference_duration",
        "queue_duration",
        "request_bytes",
        "request_duration",
        "requests",
        "response_bytes",
    )

    def __init__(self, metrics: GatewayMetrics, origin: str, model: str, accelerator: str) -> None:
        self._labels = (origin, model)
        self.requests = metrics.requests
        self._codes: dict[int, Any] = {}
        self.request_duration = metrics.request_duration.labels(origin, model)
        self.queue_duration = metrics.queue_duration.labels(origin, model)
        self.inference_duration = metrics.inference_duration.labels(origin, model)
        self.request_bytes = metrics.request_bytes.labels(origin, model)
        self.response_bytes = metrics.response_bytes.labels(origin, model)
        self.accelerator_busy = metrics.accelerator_busy.labels(origin, model, accelerator)

    def observe_request(self, status: int, seconds: float) -> None:
        counter = self._codes.get(status)
        if counter is None:
            counter = self._codes[status] = self.requests.labels(*self._labels, str(status))
        counter.inc()
        self.request_duration.observe(seconds)

    def observe_inference(
        self, request_bytes: int, response_bytes: int, queue_seconds: float, invoke_seconds: float
    ) -> None:
        self.request_bytes.observe(request_bytes)
        self.response_bytes.observe(response_bytes)
        self.queue_duration.observe(queue_seconds)
        self.inference_duration.observe(invoke_seconds)
        self.accelerator_busy.inc(invoke_seconds)
