"""The gateway's Prometheus series. Workers report their queue and invoke times in each reply,
so one scrape of the gateway sees the data plane's numbers, workers included.

Labels stay bounded: `origin` and `model` come from the route table (a name that is not served is
counted under `model=""`), `protocol` is rest or grpc, `accelerator` is cpu, gpu or npu, `code`
an HTTP status (a gRPC status as the HTTP status it stands for: `GRPC_AS_HTTP`).

The counts live in plain per-model records (`ModelSeries`) that a request updates with a few
additions, and become Prometheus families only when scraped (`collect`): `prometheus_client`'s
own histograms take a lock and search their buckets on every observation, seven per request
(bench/RESULTS.md). Everything runs on the gateway's event loop, scrapes included, so nothing is
locked.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024 items (MAX_BATCH_SIZE)

# name, help, buckets
_HISTOGRAMS = (
    (
        "modelloader_request_duration_seconds",
        "Inference request time in the gateway.",
        LATENCY_BUCKETS,
    ),
    (
        "modelloader_queue_duration_seconds",
        "Time a request waited for its interpreter.",
        LATENCY_BUCKETS,
    ),
    (
        "modelloader_inference_duration_seconds",
        "Interpreter invoke time per request.",
        LATENCY_BUCKETS,
    ),
    ("modelloader_request_bytes", "Inference request body size.", SIZE_BUCKETS),
    ("modelloader_response_bytes", "Inference response body size.", SIZE_BUCKETS),
    (
        "modelloader_batch_size",
        "Items per interpreter invoke (1 per request without spec.batching).",
        BATCH_BUCKETS,
    ),
)
(
    REQUEST_DURATION,
    QUEUE_DURATION,
    INFERENCE_DURATION,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    BATCH_SIZE,
) = range(6)


def _le(bound: float) -> str:
    """A bucket's `le` label as prometheus_client writes it ("0.001", "1.0", "+Inf")."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


_LE = {buckets: [_le(b) for b in (*buckets, float("inf"))] for _, _, buckets in _HISTOGRAMS}


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # An observation equal to a bound belongs to that bound's bucket (le: less or equal).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(_LE[self.bounds], self.counts, strict=True):
            running += count
            out.append((le, running))
        return out


class ModelSeries:
    """Every series of one (origin, model, protocol)."""

    __slots__ = ("busy_seconds", "codes", "histograms", "labels")

    def __init__(self, origin: str, model: str, protocol: str = "rest") -> None:
        self.labels = (origin, model, protocol)
        self.codes: dict[int, int] = {}
        self.histograms = tuple(_Histogram(buckets) for _, _, buckets in _HISTOGRAMS)
        self.busy_seconds: dict[str, float] = {}  # by the accelerator that ran it

    def observe_request(self, status: int, seconds: float) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1
        self.histograms[REQUEST_DURATION].observe(seconds)

    def observe_inference(
        self,
        request_bytes: int,
        response_bytes: int,
        queue_seconds: float,
        invoke_seconds: float,
        accelerator: str,
        batch: int = 1,
    ) -> None:
        """`batch`: the items of the invoke that answered, on one request per invoke (0 on
        the others of its batch), so batch sizes and busy time count each invoke once."""
        histograms = self.histograms
        histograms[REQUEST_BYTES].observe(request_bytes)
        histograms[RESPONSE_BYTES].observe(response_bytes)
        histograms[QUEUE_DURATION].observe(queue_seconds)
        histograms[INFERENCE_DURATION].observe(invoke_seconds)
        if batch:
            histograms[BATCH_SIZE].observe(batch)
            # Utilisation is rate() of this: seconds the model's accelerator spent invoking
            # per second. CPU, GPU and NPU alike; summed per origin it is the origin's share.
            busy = self.busy_seconds
            busy[accelerator] = busy.get(accelerator, 0.0) + invoke_seconds


# gRPC status codes as the HTTP status a REST call would have had: the `code` label means the
# same for both protocols (`protocol` tells them apart), and "5.." still selects server errors.
GRPC_AS_HTTP = {
    "OK": 200,
    "CANCELLED": 499,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class GatewayMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.unknown = ModelSeries("", "")  # who is unknown until authenticated
        self.unknown_grpc = ModelSeries("", "", "grpc")
        self._series: dict[tuple[str, str, str], ModelSeries] = {
            ("", "", "rest"): self.unknown,
            ("", "", "grpc"): self.unknown_grpc,
        }
        registry.register(self)

    def series(self, origin: str, model: str, protocol: str = "rest") -> ModelSeries:
        found = self._series.get((origin, model, protocol))
        if found is None:
            found = self._series[(origin, model, protocol)] = ModelSeries(origin, model, protocol)
        return found

    def collect(self) -> Iterator[Metric]:
        everything = list(self._series.values())
        requests = CounterMetricFamily(
            "modelloader_requests",
            "Inference requests by protocol and HTTP status code (gRPC's mapped to the same).",
            labels=["origin", "model", "protocol", "code"],
        )
        for series in everything:
            for code, count in sorted(series.codes.items()):
                requests.add_metric([*series.labels, str(code)], count)
        yield requests
        for index, (name, documentation, _) in enumerate(_HISTOGRAMS):
            family = HistogramMetricFamily(
                name, documentation, labels=["origin", "model", "protocol"]
            )
            for series in everything:
                histogram = series.histograms[index]
                if any(histogram.counts):
                    family.add_metric(list(series.labels), histogram.cumulative(), histogram.total)
            yield family
        busy = CounterMetricFamily(
            "modelloader_accelerator_busy_seconds",
            "Interpreter invoke time, as reported by the workers, by the accelerator that ran it.",
            labels=["origin", "model", "protocol", "accelerator"],
        )
        for series in everything:
            for accelerator, seconds in sorted(series.busy_seconds.items()):
                busy.add_metric([*series.labels, accelerator], seconds)
        yield busy

    def describe(self) -> Iterator[Metric]:
        return self.collect()
