"""The LoadedModel resource as typed, frozen objects, and the parser that turns a manifest
into them or says which field is wrong. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, cast

from modelloader_workers.wire.identity import ModelKey

from modelloader import API_GROUP, API_VERSION
from modelloader.quantity import QuantityError, parse_quantity

KIND = "LoadedModel"
API = f"{API_GROUP}/{API_VERSION}"

Accelerator = Literal["auto", "cpu", "gpu", "npu"]
Delegation = Literal["whole", "partitioned"]
Precision = Literal["fp32", "fp16"]
ACCELERATORS: tuple[Accelerator, ...] = ("auto", "cpu", "gpu", "npu")
DELEGATIONS: tuple[Delegation, ...] = ("whole", "partitioned")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")
MAX_THREADS = 64
MAX_REPLICAS = 100
MAX_BATCH_SIZE = 1024
MAX_PREFERRED_BATCH_SIZES = 16
MAX_QUEUE_DELAY_MICROSECONDS = 1_000_000  # a second: past that a queue is not a batcher's

# Kubernetes object names (DNS-1123 subdomain) and origins (DNS-1123 label).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
SHA256_PATTERN = r"^[a-f0-9]{64}$"
URI_PATTERN = r"^(file|https?|s3|gs|oci)://.+"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
_LABEL = re.compile(LABEL_PATTERN)
_SHA256 = re.compile(SHA256_PATTERN)
_URI = re.compile(URI_PATTERN)
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)


class ManifestError(ValueError):
    """A manifest that is not a valid LoadedModel; the message starts with the field's path."""


@dataclass(frozen=True)
class Source:
    uri: str
    sha256: str | None = None
    credentials_secret: str | None = None  # a Secret in the LoadedModel's namespace


@dataclass(frozen=True)
class Resources:
    memory_bytes: int | None = None
    cpu: float | None = None


@dataclass(frozen=True)
class Autoscaling:
    """Replicas follow the requests in flight (Knative's and Ray Serve's signal): about
    `target_in_flight` per replica, within [min_replicas, max_replicas]."""

    max_replicas: int
    min_replicas: int = 1  # 0: scaled to zero when idle, woken by the next request
    target_in_flight: float = 2.0
    scale_down_delay_seconds: float = 30.0  # lower load must last this long to scale down
    scale_to_zero_after_seconds: float = 60.0  # idle this long: zero replicas (min 0 only)


@dataclass(frozen=True)
class Batching:
    """Concurrent requests stacked into one invoke, Triton's dynamic batcher's knobs."""

    max_batch_size: int
    max_queue_delay_microseconds: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class LoadedModelSpec:
    origin: str
    source: Source
    accelerator: Accelerator = "auto"
    delegation: Delegation = "partitioned"
    precision: Precision = "fp32"
    threads: int = 1
    resources: Resources = Resources()
    replicas: int = 1  # a fixed count (`kubectl scale`, an HPA); ignored with `autoscaling`
    autoscaling: Autoscaling | None = None
    batching: Batching | None = None

    def loaded_as(self) -> dict[str, Any]:
        """What a worker must load: the spec less how many replicas run it. Batching is
        left out when off, so models without it keep the fingerprints they had before it (and
        so is an unset credentialsSecret)."""
        loaded = asdict(self)
        del loaded["replicas"], loaded["autoscaling"]
        if loaded["batching"] is None:
            del loaded["batching"]
        if loaded["source"]["credentials_secret"] is None:
            del loaded["source"]["credentials_secret"]
        return loaded


@dataclass(frozen=True)
class LoadedModel:
    namespace: str
    name: str
    spec: LoadedModelSpec
    generation: int = 1
    # Where a relative file:// URI is resolved from: the manifest's folder in local mode.
    base_dir: Path | None = None

    # Both cached: every pass of the control loop asks each model for them many times over,
    # and at 500 models hashing the spec again each time took half of the loop's time.
    @cached_property
    def key(self) -> ModelKey:
        return ModelKey(self.namespace, self.name)

    @cached_property
    def fingerprint(self) -> str:
        """Changes exactly when what the worker must load changes."""
        data = {"spec": self.spec.loaded_as(), "base": str(self.base_dir)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_loaded_model(
    doc: Mapping[str, Any], *, default_namespace: str = "default", base_dir: Path | None = None
) -> LoadedModel:
    if doc.get("apiVersion") != API or doc.get("kind") != KIND:
        raise ManifestError(
            f"apiVersion/kind: expected {API} {KIND}, got "
            f"{doc.get('apiVersion')!r} {doc.get('kind')!r}"
        )
    meta = _mapping(doc.get("metadata"), "metadata")
    name = _string(meta.get("name"), "metadata.name")
    if not _NAME.match(name):
        raise ManifestError(
            f"metadata.name: {name!r} must be lowercase letters, digits, '-' or '.', "
            "starting and ending with a letter or digit"
        )
    namespace = meta.get("namespace", default_namespace)
    namespace = _string(namespace, "metadata.namespace")
    _label(namespace, "metadata.namespace")
    generation = meta.get("generation", 1)
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise ManifestError("metadata.generation: must be a positive integer")
    spec = parse_spec(_mapping(doc.get("spec"), "spec"), namespace)
    return LoadedModel(namespace, name, spec, generation, base_dir)


def parse_spec(spec: Mapping[str, Any], namespace: str) -> LoadedModelSpec:
    _no_unknown(
        spec,
        {
            "origin",
            "source",
            "accelerator",
            "delegation",
            "precision",
            "threads",
            "resources",
            "replicas",
            "autoscaling",
            "batching",
        },
        "spec",
    )
    origin = _string(spec.get("origin", namespace), "spec.origin")
    _label(origin, "spec.origin")

    raw_source = _mapping(spec.get("source"), "spec.source")
    _no_unknown(raw_source, {"uri", "sha256", "credentialsSecret"}, "spec.source")
    uri = _string(raw_source.get("uri"), "spec.source.uri")
    if not _URI.match(uri):
        raise ManifestError(
            f"spec.source.uri: {uri!r} must start with file://, http://, https://, s3://, "
            "gs:// or oci://"
        )
    credentials_secret = raw_source.get("credentialsSecret")
    if credentials_secret is not None:
        credentials_secret = _string(credentials_secret, "spec.source.credentialsSecret")
        if not _SECRET_NAME.match(credentials_secret):
            raise ManifestError(
                "spec.source.credentialsSecret: must be a Secret's name (lowercase letters, "
                "digits, '-' and '.')"
            )
    sha256 = raw_source.get("sha256")
    if sha256 is not None:
        sha256 = _string(sha256, "spec.source.sha256")
        if not _SHA256.match(sha256):
            raise ManifestError("spec.source.sha256: must be 64 lowercase hexadecimal digits")

    threads = spec.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
        raise ManifestError(f"spec.threads: must be an integer from 1 to {MAX_THREADS}")

    raw_resources = _mapping(spec.get("resources", {}), "spec.resources")
    _no_unknown(raw_resources, {"memory", "cpu"}, "spec.resources")
    resources = Resources(
        memory_bytes=_quantity(raw_resources, "memory", integer=True),
        cpu=_quantity(raw_resources, "cpu", integer=False),
    )
    accelerator = cast(Accelerator, _enum(spec, "accelerator", ACCELERATORS, "auto"))
    delegation = cast(Delegation, _enum(spec, "delegation", DELEGATIONS, "partitioned"))
    if accelerator == "cpu" and delegation == "whole":  # the CRD's CEL rule says the same
        raise ManifestError(
            "spec.delegation: 'whole' puts the whole graph on an accelerator; with accelerator "
            "'cpu' use 'partitioned'"
        )
    if "replicas" in spec and "autoscaling" in spec:  # the CRD's CEL rule says the same
        raise ManifestError(
            "spec.replicas: a fixed count and spec.autoscaling are exclusive; remove one "
            "(kubectl scale sets spec.replicas)"
        )
    replicas = _whole(spec, "replicas", 0, MAX_REPLICAS, 1, "spec")
    autoscaling = None
    if "autoscaling" in spec:
        autoscaling = _autoscaling(_mapping(spec["autoscaling"], "spec.autoscaling"))
    batching = None
    if "batching" in spec:
        batching = _batching(_mapping(spec["batching"], "spec.batching"))
    return LoadedModelSpec(
        origin=origin,
        source=Source(uri, sha256, credentials_secret),
        accelerator=accelerator,
        delegation=delegation,
        precision=cast(Precision, _enum(spec, "precision", PRECISIONS, "fp32")),
        threads=threads,
        resources=resources,
        replicas=replicas,
        autoscaling=autoscaling,
        batching=batching,
    )


def _batching(raw: Mapping[str, Any]) -> Batching:
    where = "spec.batching"
    _no_unknown(raw, {"maxBatchSize", "maxQueueDelayMicroseconds", "preferredBatchSizes"}, where)
    if "maxBatchSize" not in raw:
        raise ManifestError(f"{where}.maxBatchSize: required")
    size = _whole(raw, "maxBatchSize", 1, MAX_BATCH_SIZE, 1, where)
    delay = _whole(raw, "maxQueueDelayMicroseconds", 0, MAX_QUEUE_DELAY_MICROSECONDS, 0, where)
    preferred = raw.get("preferredBatchSizes", [])
    if not isinstance(preferred, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= size for p in preferred
    ):
        raise ManifestError(
            f"{where}.preferredBatchSizes: must be a list of whole numbers from 1 to "
            f"maxBatchSize ({size})"
        )
    if len(set(preferred)) != len(preferred):
        raise ManifestError(f"{where}.preferredBatchSizes: a size is listed twice")
    if len(preferred) > MAX_PREFERRED_BATCH_SIZES:  # the CRD's maxItems
        raise ManifestError(
            f"{where}.preferredBatchSizes: at most {MAX_PREFERRED_BATCH_SIZES} sizes"
        )
    return Batching(size, delay, tuple(sorted(preferred)))


def _autoscaling(raw: Mapping[str, Any]) -> Autoscaling:
    where = "spec.autoscaling"
    _no_unknown(
        raw,
        {
            "minReplicas",
            "maxReplicas",
            "targetInFlight",
            "scaleDownDelaySeconds",
            "scaleToZeroAfterSeconds",
        },
        where,
    )
    if "maxReplicas" not in raw:
        raise ManifestError(f"{where}.maxReplicas: required")
    maximum = _whole(raw, "maxReplicas", 1, MAX_REPLICAS, 1, where)
    minimum = _whole(raw, "minReplicas", 0, MAX_REPLICAS, 1, where)
    if minimum > maximum:
        raise ManifestError(f"{where}.minReplicas: {minimum} is more than maxReplicas ({maximum})")
    target = _number(raw, "targetInFlight", 2.0, where, low=0.0, high=10000.0, open_low=True)
    return Autoscaling(
        max_replicas=maximum,
        min_replicas=minimum,
        target_in_flight=target,
        scale_down_delay_seconds=_number(
            raw, "scaleDownDelaySeconds", 30.0, where, low=0.0, high=3600.0
        ),
        scale_to_zero_after_seconds=_number(
            raw, "scaleToZeroAfterSeconds", 60.0, where, low=0.0, high=86400.0
        ),
    )


def _whole(raw: Mapping[str, Any], key: str, low: int, high: int, default: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"{where}.{key}: must be a whole number from {low} to {high}")
    return value


def _number(
    raw: Mapping[str, Any],
    key: str,
    default: float,
    where: str,
    *,
    low: float,
    high: float,
    open_low: bool = False,
) -> float:
    value = raw.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (value <= low if open_low else value < low):
        ok = False
    if not ok or value > high:
        bound = f"more than {low:g}" if open_low else f"from {low:g}"
        raise ManifestError(f"{where}.{key}: must be a number {bound} to {high:g}")
    return float(value)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"{field}: required, and must be a mapping")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{field}: required, and must be a non-empty string")
    return value


def _label(value: str, field: str) -> None:
    if not _LABEL.match(value):
        raise ManifestError(
            f"{field}: {value!r} must be at most 63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )


def _enum(spec: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = spec.get(key, default)
    if value not in allowed:
        raise ManifestError(f"spec.{key}: must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _quantity(raw: Mapping[str, Any], key: str, *, integer: bool) -> Any:
    if key not in raw:
        return None
    try:
        amount = parse_quantity(raw[key])
    except QuantityError as error:
        raise ManifestError(f"spec.resources.{key}: {error}") from None
    if amount <= 0:
        raise ManifestError(f"spec.resources.{key}: must be more than zero")
    return int(amount) if integer else float(amount)


def _no_unknown(raw: Mapping[str, Any], known: set[str], field: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(
            f"{field}.{unknown[0]}: unknown field; known fields are {', '.join(sorted(known))}"
        )
