"""Generates the Grafana dashboards of this folder from code, with grafana-foundation-sdk.

    .venv/bin/python dashboards/generate.py            # rewrites dashboards/*.json
    .venv/bin/python dashboards/generate.py --out DIR  # writes them elsewhere

The committed JSON is this script's output: `tests/unit/test_dashboards.py` regenerates it and
fails on any difference, and `tests/e2e/test_prometheus.py` runs every panel's query against a
real Prometheus scraping `modelloader local`. Every dashboard is templated by `datasource`,
`origin` and `model`; the series are those of `operator/modelloader/control_metrics.py` and
`workers/modelloader_gateway/{metrics,nvml_metrics}.py`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
ORIGIN = 'origin=~"$origin"'
MODEL = 'model=~"$model"'
PERCENTILES = (0.5, 0.95, 0.99)


def sel(*matchers: str) -> str:
    return "{" + ", ".join(matchers) + "}"


SERVED = sel(ORIGIN, MODEL)


# Building blocks


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref)
        .range()
        .datasource(DATASOURCE)
    )


def queries(*pairs: tuple[str, str]) -> list[prometheus.Dataquery]:
    return [query(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def graph(
    title: str, unit: str, targets: list[prometheus.Dataquery], description: str, width: int = 12
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .height(8)
        .span(width)
    )


def single(
    title: str, unit: str, targets: list[prometheus.Dataquery], description: str, width: int = 6
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(width)
    )


def quantiles(metric: str, by: str, matchers: str, legend: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{matchers}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in PERCENTILES
    ]


def variables(multi_model: bool) -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    every = VariableOption(selected=True, text="All", value="$__all")
    origin = (
        dashboard.QueryVariable("origin")
        .label("Origin")
        .datasource(DATASOURCE)
        .query("label_values(modelloader_origin_quota_used, origin)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(every)
    )
    # Every LoadedModel that exists has a restart series (at zero until a worker dies).
    model = (
        dashboard.QueryVariable("model")
        .label("Model")
        .datasource(DATASOURCE)
        .query(f"label_values(modelloader_worker_restarts_total{sel(ORIGIN)}, model)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(multi_model)
        .include_all(multi_model)
    )
    if multi_model:
        model = model.all_value(".*").current(every)
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        origin,
        model,
    ]


def base(uid: str, title: str, description: str, multi_model: bool = True) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["modelloader"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .variables(list(variables(multi_model)))
    )


def error_ratio(by: str, matchers: str) -> str:
    """5xx responses over all; 0 rather than no data while there are none."""
    errors = f'modelloader_requests_total{{{matchers[1:-1]}, code=~"5.."}}'
    total = f"sum by ({by}) (rate(modelloader_requests_total{matchers}[{RATE}]))"
    return f"(sum by ({by}) (rate({errors}[{RATE}])) or {total} * 0) / {total}"


# The dashboards


def overview() -> dashboard.Dashboard:
    per_model = "origin, model"
    quota = sel(ORIGIN)
    return (
        base(
            "modelloader-overview",
            "Model Loader / Overview",
            "Traffic, errors, latency, accelerator use and quota per origin and model.",
        )
        .with_row(dashboard.Row("Traffic"))
        .with_panel(
            graph(
                "Requests per second",
                "reqps",
                queries(
                    (
                        f"sum by ({per_model}, protocol) "
                        f"(rate(modelloader_requests_total{SERVED}[{RATE}]))",
                        "{{origin}}/{{model}} {{protocol}}",
                    )
                ),
                "Inference requests per origin, model and protocol (rest, grpc), every status.",
                8,
            )
        )
        .with_panel(
            graph(
                "Responses by status code",
                "reqps",
                queries(
                    (
                        f"sum by (protocol, code) "
                        f"(rate(modelloader_requests_total{SERVED}[{RATE}]))",
                        "{{protocol}} {{code}}",
                    )
                ),
                "4xx: the caller's request (bad tensors, unknown model, too large); "
                "5xx: the server (503 while a model is not ready). gRPC's status codes are "
                "counted as the HTTP status they stand for.",
                8,
            )
        )
        .with_panel(
            graph(
                "Error ratio (5xx)",
                "percentunit",
                queries((error_ratio(per_model, SERVED), "{{origin}}/{{model}}")),
                "Share of requests answered with a 5xx status.",
                8,
            )
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(
            graph(
                "Request duration p50 / p95 / p99",
                "s",
                queries(
                    *quantiles(
                        "modelloader_request_duration_seconds",
                        per_model,
                        SERVED,
                        "{{origin}}/{{model}}",
                    )
                ),
                "End to end in the gateway: decoding, queueing, inference, encoding.",
                24,
            )
        )
        .with_row(dashboard.Row("Accelerators"))
        .with_panel(
            graph(
                "Accelerator utilisation per model",
                "percentunit",
                queries(
                    (
                        f"sum by ({per_model}, accelerator) "
                        f"(rate(modelloader_accelerator_busy_seconds_total{SERVED}[{RATE}]))",
                        "{{origin}}/{{model}} on {{accelerator}}",
                    )
                ),
                "Seconds of interpreter invoke per second: 1 = one accelerator (or CPU "
                "thread pool) kept busy all the time.",
            )
        )
        .with_panel(
            graph(
                "Accelerator utilisation per origin",
                "percentunit",
                queries(
                    (
                        "sum by (origin, accelerator) "
                        f"(rate(modelloader_accelerator_busy_seconds_total{quota}[{RATE}]))",
                        "{{origin}} on {{accelerator}}",
                    )
                ),
                "The origin's models together, per accelerator class.",
            )
        )
        .with_panel(
            graph(
                "GPU utilisation (NVML)",
                "percentunit",
                queries(("modelloader_gpu_utilization_ratio", "{{instance}} GPU {{device}}")),
                "Per device, where NVML finds an NVIDIA GPU; empty elsewhere.",
            )
        )
        .with_panel(
            graph(
                "GPU memory (NVML)",
                "bytes",
                queries(
                    ("modelloader_gpu_memory_used_bytes", "{{instance}} GPU {{device}} used"),
                    ("modelloader_gpu_memory_total_bytes", "{{instance}} GPU {{device}} total"),
                ),
                "Per device, where NVML finds an NVIDIA GPU; empty elsewhere.",
            )
        )
        .with_row(dashboard.Row("Quota"))
        .with_panel(
            graph(
                "Quota used / limit",
                "percentunit",
                queries(
                    (
                        f"modelloader_origin_quota_used{quota} / on (origin, resource) "
                        f"modelloader_origin_quota_limit{quota} or label_replace(sum by (origin) "
                        f"(rate(modelloader_requests_total{quota}[{RATE}])), "
                        '"resource", "requests_per_second", "", "") / on (origin, resource) '
                        "modelloader_origin_quota_limit"
                        + sel(ORIGIN, 'resource="requests_per_second"'),
                        "{{origin}} {{resource}}",
                    )
                ),
                "1 = the origin is at its quota for the resource; new models wait, requests "
                "over the rate get 429. Unlimited resources have no line.",
                8,
            )
        )
        .with_panel(
            graph(
                "Request rate against limit",
                "reqps",
                queries(
                    (
                        f"sum by (origin) (rate(modelloader_requests_total{quota}[{RATE}]))",
                        "{{origin}}",
                    ),
                    (
                        "modelloader_origin_quota_limit"
                        + sel(ORIGIN, 'resource="requests_per_second"'),
                        "{{origin}} limit",
                    ),
                ),
                "Requests per second per origin, answered or turned away (429).",
                8,
            )
        )
        .with_panel(
            graph(
                "Models and workers",
                "short",
                queries(
                    (
                        f'modelloader_origin_quota_used{{{ORIGIN}, resource=~"models|workers"}}',
                        "{{origin}} {{resource}}",
                    ),
                    (
                        f'modelloader_origin_quota_limit{{{ORIGIN}, resource=~"models|workers"}}',
                        "{{origin}} {{resource}} limit",
                    ),
                ),
                "Used against the limit, where there is one.",
                8,
            )
        )
        .with_panel(
            graph(
                "Memory",
                "bytes",
                queries(
                    (
                        f'modelloader_origin_quota_used{{{ORIGIN}, resource="memory"}}',
                        "{{origin}} used",
                    ),
                    (
                        f'modelloader_origin_quota_limit{{{ORIGIN}, resource="memory"}}',
                        "{{origin}} limit",
                    ),
                ),
                "What the origin's models reserve, against the limit.",
                12,
            )
        )
        .with_panel(
            graph(
                "CPU, GPUs, NPUs",
                "short",
                queries(
                    (
                        f'modelloader_origin_quota_used{{{ORIGIN}, resource=~"cpu|gpus|npus"}}',
                        "{{origin}} {{resource}}",
                    ),
                    (
                        f'modelloader_origin_quota_limit{{{ORIGIN}, resource=~"cpu|gpus|npus"}}',
                        "{{origin}} {{resource}} limit",
                    ),
                ),
                "CPU in cores; GPUs and NPUs in devices.",
                12,
            )
        )
    )


def model_drilldown() -> dashboard.Dashboard:
    return (
        base(
            "modelloader-model",
            "Model Loader / Model",
            "One model: where its time goes (queue against inference), its loads and restarts.",
            multi_model=False,
        )
        .with_row(dashboard.Row("Time per request"))
        .with_panel(
            graph(
                "Median: request, queue, inference",
                "s",
                queries(
                    *[
                        (
                            f"histogram_quantile(0.5, sum by (le) "
                            f"(rate(modelloader_{name}_duration_seconds_bucket{SERVED}[{RATE}])))",
                            name,
                        )
                        for name in ("request", "queue", "inference")
                    ]
                ),
                "Queue: waiting for the worker's interpreter. Inference: the interpreter's "
                "invoke. The rest of the request is transport and tensor coding.",
            )
        )
        .with_panel(
            graph(
                "p99: request, queue, inference",
                "s",
                queries(
                    *[
                        (
                            f"histogram_quantile(0.99, sum by (le) "
                            f"(rate(modelloader_{name}_duration_seconds_bucket{SERVED}[{RATE}])))",
                            name,
                        )
                        for name in ("request", "queue", "inference")
                    ]
                ),
                "The slowest 1% of requests.",
            )
        )
        .with_panel(
            graph(
                "Responses by status code",
                "reqps",
                queries(
                    (
                        f"sum by (protocol, code) "
                        f"(rate(modelloader_requests_total{SERVED}[{RATE}]))",
                        "{{protocol}} {{code}}",
                    )
                ),
                "Requests per second by protocol and HTTP status (gRPC's as the same).",
                8,
            )
        )
        .with_panel(
            graph(
                "Request and response size p95",
                "bytes",
                queries(
                    *[
                        (
                            f"histogram_quantile(0.95, sum by (le) "
                            f"(rate(modelloader_{kind}_bytes_bucket{SERVED}[{RATE}])))",
                            kind,
                        )
                        for kind in ("request", "response")
                    ]
                ),
                "Body sizes, JSON or binary tensors.",
                8,
            )
        )
        .with_panel(
            graph(
                "Accelerator utilisation",
                "percentunit",
                queries(
                    (
                        "sum by (accelerator) "
                        f"(rate(modelloader_accelerator_busy_seconds_total{SERVED}[{RATE}]))",
                        "{{accelerator}}",
                    )
                ),
                "Seconds of invoke per second on the accelerator that runs the model.",
                8,
            )
        )
        .with_row(dashboard.Row("Batching"))
        .with_panel(
            graph(
                "Batch size: items per invoke",
                "short",
                queries(
                    (
                        f"sum(rate(modelloader_batch_size_sum{SERVED}[{RATE}])) / "
                        f"sum(rate(modelloader_batch_size_count{SERVED}[{RATE}]))",
                        "mean",
                    ),
                    *quantiles("modelloader_batch_size", "model", SERVED, "items"),
                ),
                "With spec.batching, the items each interpreter invoke ran (1 per request "
                "without it). The queue time above includes the wait for a batch to fill "
                "(at most maxQueueDelayMicroseconds).",
            )
        )
        .with_panel(
            graph(
                "Invokes and requests",
                "ops",
                queries(
                    (f"sum(rate(modelloader_batch_size_count{SERVED}[{RATE}]))", "invokes"),
                    (
                        f"sum(rate(modelloader_requests_total{SERVED}[{RATE}]))",
                        "requests",
                    ),
                ),
                "Batching shows as fewer invokes than requests.",
            )
        )
        .with_row(dashboard.Row("Loads and restarts"))
        .with_panel(
            single(
                "Loads",
                "short",
                queries(
                    (
                        "sum by (accelerator) "
                        f"(modelloader_model_load_duration_seconds_count{SERVED})",
                        "{{accelerator}}",
                    )
                ),
                "Workers that loaded this model since the control plane started.",
            )
        )
        .with_panel(
            single(
                "Mean load time",
                "s",
                queries(
                    (
                        "sum by (accelerator) "
                        f"(modelloader_model_load_duration_seconds_sum{SERVED}) / "
                        "sum by (accelerator) "
                        f"(modelloader_model_load_duration_seconds_count{SERVED})",
                        "{{accelerator}}",
                    )
                ),
                "From starting a worker to the model being ready: process, fetch and load.",
            )
        )
        .with_panel(
            single(
                "Worker restarts",
                "short",
                queries((f"sum(modelloader_worker_restarts_total{SERVED})", "restarts")),
                "Workers replaced after dying, since the control plane started.",
            )
        )
        .with_panel(
            graph(
                "Worker restarts over time",
                "short",
                queries(
                    (
                        f"sum(increase(modelloader_worker_restarts_total{SERVED}[{RATE}]))",
                        "restarts",
                    )
                ),
                "A steady climb is a crash loop.",
                6,
            )
        )
    )


def control_plane() -> dashboard.Dashboard:
    return (
        base(
            "modelloader-control-plane",
            "Model Loader / Control plane",
            "The reconcile loop (operator or modelloader local): models by phase, pass "
            "duration and errors, repairs, loads and restarts.",
        )
        .with_row(dashboard.Row("Models"))
        .with_panel(
            graph(
                "LoadedModels by phase",
                "short",
                queries(("sum by (phase) (modelloader_models)", "{{phase}}")),
                "Every LoadedModel the control plane knows, by phase.",
                8,
            )
        )
        .with_panel(
            graph(
                "Waiting models (queue depth)",
                "short",
                queries(("sum(modelloader_reconcile_queue_depth)", "waiting")),
                "Pending (no capacity or quota yet) or Loading.",
                8,
            )
        )
        .with_panel(
            graph(
                "Drift repairs",
                "short",
                queries(
                    (
                        f"sum by (action) (increase(modelloader_drift_repairs_total[{RATE}]))",
                        "{{action}}",
                    )
                ),
                "Workers started (missing or dead) and stopped (no longer wanted).",
                8,
            )
        )
        .with_row(dashboard.Row("Reconcile loop"))
        .with_panel(
            graph(
                "Reconcile duration",
                "s",
                queries(
                    *[
                        (
                            f"histogram_quantile({q}, sum by (le) "
                            f"(rate(modelloader_reconcile_duration_seconds_bucket[{RATE}])))",
                            f"p{round(q * 100)}",
                        )
                        for q in PERCENTILES
                    ]
                ),
                "One pass: read the desired state, plan, apply, render statuses.",
                8,
            )
        )
        .with_panel(
            graph(
                "Reconcile passes per second",
                "short",
                queries(
                    (
                        f"sum(rate(modelloader_reconcile_duration_seconds_count[{RATE}]))",
                        "passes",
                    )
                ),
                "Passes run on a timer and on every observed change.",
                8,
            )
        )
        .with_panel(
            graph(
                "Reconcile errors",
                "short",
                queries(
                    (
                        f"sum(increase(modelloader_reconcile_errors_total[{RATE}]))",
                        "errors",
                    )
                ),
                "Passes that raised; the log says why.",
                8,
            )
        )
        .with_row(dashboard.Row("Workers"))
        .with_panel(
            graph(
                "Mean model load time by accelerator",
                "s",
                queries(
                    (
                        "sum by (accelerator) "
                        f"(modelloader_model_load_duration_seconds_sum{SERVED}) / "
                        "sum by (accelerator) "
                        f"(modelloader_model_load_duration_seconds_count{SERVED})",
                        "{{accelerator}}",
                    )
                ),
                "Since the control plane started.",
            )
        )
        .with_panel(
            graph(
                "Worker restarts by origin",
                "short",
                queries(
                    (
                        "sum by (origin) "
                        f"(increase(modelloader_worker_restarts_total{SERVED}[{RATE}]))",
                        "{{origin}}",
                    )
                ),
                "Workers replaced after dying.",
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "modelloader-overview.json": overview,
    "modelloader-model.json": model_drilldown,
    "modelloader-control-plane.json": control_plane,
}


def render(builder: dashboard.Dashboard) -> str:
    return json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in DASHBOARDS.items():
        path = out / name
        path.write_text(render(make()))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder (default: this one)")
    for path in write_all(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
