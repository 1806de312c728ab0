"""The gateway's Prometheus series. Workers report their queue and invoke times in each reply,
so one scrape of the gateway sees the data plane's numbers, workers included.

Labels stay bounded: `origin` and `model` come from the directory (a name that is not served is
counted under `model=""`), `accelerator` is cpu, gpu or npu, `code` an HTTP status.
"""

from __future__ import annotations

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
