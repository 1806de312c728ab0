"""The OriginPolicy resource as typed, frozen objects: an origin's quotas, the namespaces that
speak for it, and how its models are isolated. Pure: no I/O.

An origin without an OriginPolicy gets the operator's default policy. A namespace speaks for
the origins whose policy lists it; an origin whose policy lists no namespaces (or that has no
policy) is spoken for by the namespace of the same name only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from modelloader import API_GROUP, API_VERSION
from modelloader.quantity import QuantityError, parse_quantity
from modelloader.resource import LABEL_PATTERN, ManifestError

KIND = "OriginPolicy"
API = f"{API_GROUP}/{API_VERSION}"
Isolation = Literal["perModel", "perOrigin"]
ISOLATIONS: tuple[Isolation, ...] = ("perModel", "perOrigin")
_LABEL = re.compile(LABEL_PATTERN)

# quota field -> (kind of value); a quantity may be written "512Mi", an integer any number.
_INTEGER_FIELDS = ("maxModels", "maxWorkers", "gpus", "npus", "maxConcurrentRequests")
_QUANTITY_FIELDS = ("memory", "cpu", "maxModelBytes")
QUOTA_FIELDS = (*_INTEGER_FIELDS, *_QUANTITY_FIELDS, "requestsPerSecond")


@dataclass(frozen=True)
class Quota:
    """None is unlimited."""

    max_models: int | None = None
    max_workers: int | None = None
    memory_bytes: int | None = None
    cpu: float | None = None
    gpus: int | None = None
    npus: int | None = None
    max_model_bytes: int | None = None
    requests_per_second: float | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class OriginPolicy:
    origin: str
    namespaces: tuple[str, ...] = ()
    quota: Quota = Quota()
    isolation: Isolation = "perModel"
    expose_accelerator_details: bool = False
    allow_anonymous: bool = False
    explicit: bool = True  # False: the default policy applied to an origin without one

    def bound_namespaces(self) -> tuple[str, ...]:
        return self.namespaces or (self.origin,)

    def process_slots(self) -> int:
        """How many shared worker processes a perOrigin origin runs."""
        return max(1, self.quota.max_workers or 1)


@dataclass(frozen=True)
class Policies:
    """Every known OriginPolicy and the default for the rest."""

    default: OriginPolicy = field(default_factory=lambda: OriginPolicy("", explicit=False))
    by_origin: Mapping[str, OriginPolicy] = field(default_factory=dict)
    # The default as each origin without a policy of its own gets it, made once: a pass over
    # 500 models asks `of` thousands of times, and `replace` was a fifth of the planner's time.
    _defaults: dict[str, OriginPolicy] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def of(self, origin: str) -> OriginPolicy:
        found = self.by_origin.get(origin)
        if found is not None:
            return found
        made = self._defaults.get(origin)
        if made is None:
            made = self._defaults[origin] = replace(self.default, origin=origin, namespaces=())
        return made

    def binds(self, origin: str, namespace: str) -> bool:
        return namespace in self.of(origin).bound_namespaces()

    def origins_of(self, namespace: str) -> tuple[str, ...]:
        """The origins a namespace speaks for: those listing it, and its namesake."""
        listed = [p.origin for p in self.by_origin.values() if namespace in p.namespaces]
        if self.binds(namespace, namespace) and namespace not in listed:
            listed.append(namespace)
        return tuple(sorted(listed))


def policies(default: OriginPolicy, found: Iterable[OriginPolicy]) -> Policies:
    return Policies(replace(default, explicit=False), {p.origin: p for p in found})


def parse_origin_policy(doc: Mapping[str, Any]) -> OriginPolicy:
    if doc.get("apiVersion") != API or doc.get("kind") != KIND:
        raise ManifestError(
            f"apiVersion/kind: expected {API} {KIND}, got "
            f"{doc.get('apiVersion')!r} {doc.get('kind')!r}"
        )
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        raise ManifestError("metadata: required, and must be a mapping")
    origin = meta.get("name")
    if not isinstance(origin, str) or not _LABEL.match(origin):
        raise ManifestError(
            "metadata.name: the origin's name: at most 63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    spec = doc.get("spec", {})
    if not isinstance(spec, Mapping):
        raise ManifestError("spec: must be a mapping")
    return parse_policy_spec(spec, origin)


def parse_policy_spec(spec: Mapping[str, Any], origin: str = "") -> OriginPolicy:
    """A policy's spec; with no origin, the operator's default policy."""
    known = {"namespaces", "quota", "isolation", "exposeAcceleratorDetails", "allowAnonymous"}
    _no_unknown(spec, known, "spec")
    namespaces = spec.get("namespaces") or []
    if not isinstance(namespaces, list) or not all(
        isinstance(n, str) and _LABEL.match(n) for n in namespaces
    ):
        raise ManifestError("spec.namespaces: must be a list of namespace names")
    isolation = spec.get("isolation", "perModel")
    if isolation not in ISOLATIONS:
        raise ManifestError(
            f"spec.isolation: must be one of {', '.join(ISOLATIONS)}; got {isolation!r}"
        )
    return OriginPolicy(
        origin=origin,
        namespaces=tuple(dict.fromkeys(namespaces)),
        quota=_quota(spec.get("quota", {})),
        isolation=cast(Isolation, isolation),
        expose_accelerator_details=_flag(spec, "exposeAcceleratorDetails"),
        allow_anonymous=_flag(spec, "allowAnonymous"),
    )


def _quota(raw: Any) -> Quota:
    if not isinstance(raw, Mapping):
        raise ManifestError("spec.quota: must be a mapping")
    _no_unknown(raw, set(QUOTA_FIELDS), "spec.quota")
    ints: dict[str, int | None] = {}
    for name in _INTEGER_FIELDS:
        value = raw.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ManifestError(f"spec.quota.{name}: must be a whole number, 0 or more")
        ints[name] = value
    amounts: dict[str, float | None] = {}
    for name in _QUANTITY_FIELDS:
        if raw.get(name) is None:
            amounts[name] = None
            continue
        try:
            amounts[name] = float(parse_quantity(raw[name]))
        except QuantityError as error:
            raise ManifestError(f"spec.quota.{name}: {error}") from None
    rate = raw.get("requestsPerSecond")
    if rate is not None and (
        not isinstance(rate, int | float)
        or isinstance(rate, bool)
        or rate < 0
        or not math.isfinite(rate)
    ):
        raise ManifestError("spec.quota.requestsPerSecond: must be a number, 0 or more")
    memory, model_bytes = amounts["memory"], amounts["maxModelBytes"]
    return Quota(
        max_models=ints["maxModels"],
        max_workers=ints["maxWorkers"],
        memory_bytes=int(memory) if memory is not None else None,
        cpu=amounts["cpu"],
        gpus=ints["gpus"],
        npus=ints["npus"],
        max_model_bytes=int(model_bytes) if model_bytes is not None else None,
        requests_per_second=float(rate) if rate is not None else None,
        max_concurrent_requests=ints["maxConcurrentRequests"],
    )


def _flag(spec: Mapping[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise ManifestError(f"spec.{key}: must be true or false")
    return value


def _no_unknown(raw: Mapping[str, Any], known: set[str], field_path: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(
            f"{field_path}.{unknown[0]}: unknown field; known fields are {', '.join(sorted(known))}"
        )
