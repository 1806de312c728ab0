"""
A thin extension of KMock 0.8's ``KubernetesEmulator`` so that kopf 1.45.2
sees the API semantics it relies on (see EXTENSIONS at the bottom).

Usage::

    emu = RealisticEmulator()
    register_modelloader_resources(emu)
    async with emu, kmock.Server(emu) as server:
        url = str(server.url).rstrip('/')      # e.g. http://127.0.0.1:40123
        ...

Everything below is plain KMock API + the overrides of a few hooks
(``_handle``, ``_serve_list``, ``_serve_watch``, ``_serve_create/update/delete``).
"""

import collections
import copy
import datetime
import itertools
import random
import re
import string
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import apps, dicts, enums, parsing, references, rendering

LOADEDMODELS = "modelloader.dev/v1alpha1/loadedmodels"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
NAMESPACES = "v1/namespaces"
EVENTS = "v1/events"
ORIGINPOLICIES = "modelloader.dev/v1alpha1/originpolicies"
SECRETS = "v1/secrets"

# kopf silently skips resources that lack the list+watch+patch verbs in discovery.
ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


def register_modelloader_resources(
    emu: kmock.KubernetesEmulator, *, namespaces: tuple[str, ...] = ("default",)
) -> None:
    """Discovery info + the backbone kopf waits for + the CRD & Namespace objects."""
    emu.resources[LOADEDMODELS] = kmock.ResourceInfo(
        kind="LoadedModel",
        singular="loadedmodel",
        namespaced=True,
        shortnames={"lm"},
        verbs=ALL_VERBS,
        subresources={"status", "scale"},
    )
    emu.resources[CRDS] = kmock.ResourceInfo(
        kind="CustomResourceDefinition",
        singular="customresourcedefinition",
        namespaced=False,
        shortnames={"crd", "crds"},
        verbs=ALL_VERBS,
        subresources={"status"},
    )
    emu.resources[NAMESPACES] = kmock.ResourceInfo(
        kind="Namespace",
        singular="namespace",
        namespaced=False,
        shortnames={"ns"},
        verbs=ALL_VERBS - {"deletecollection"},
        subresources={"status", "finalize"},
    )
    emu.resources[ORIGINPOLICIES] = kmock.ResourceInfo(
        kind="OriginPolicy",
        singular="originpolicy",
        namespaced=False,
        shortnames={"op"},
        verbs=ALL_VERBS,
        subresources={"status"},
    )
    emu.resources[SECRETS] = kmock.ResourceInfo(
        kind="Secret", singular="secret", namespaced=True, verbs=ALL_VERBS
    )
    emu.resources[EVENTS] = kmock.ResourceInfo(
        kind="Event",
        singular="event",
        namespaced=True,
        shortnames={"ev"},
        verbs=ALL_VERBS,
    )
    # Objects: as `kubectl apply -f crds/` and a namespace would leave them in a real cluster.
    # (Stored raw; RealisticEmulator stamps uid/resourceVersion/... on the first API request.)
    emu.objects[CRDS, None, "loadedmodels.modelloader.dev"] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "loadedmodels.modelloader.dev"},
        "spec": {
            "group": "modelloader.dev",
            "scope": "Namespaced",
            "names": {
                "kind": "LoadedModel",
                "plural": "loadedmodels",
                "singular": "loadedmodel",
                "shortNames": ["lm"],
                "listKind": "LoadedModelList",
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    emu.objects[CRDS, None, "originpolicies.modelloader.dev"] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "originpolicies.modelloader.dev"},
        "spec": {
            "group": "modelloader.dev",
            "scope": "Cluster",
            "names": {
                "kind": "OriginPolicy",
                "plural": "originpolicies",
                "singular": "originpolicy",
                "shortNames": ["op"],
                "listKind": "OriginPolicyList",
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    for ns in namespaces:
        emu.objects[NAMESPACES, None, ns] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }


# ---------------------------------------------------------------------------------------------
# KMock 0.8 bug: the core "namespaces" resource is parsed as the /namespaces/{ns}/ URL prefix:
#   /api/v1/namespaces          -> ValueError (HTTP 500)  -- kopf lists/watches it in namespaced mode
#   /api/v1/namespaces/default  -> plural=None, namespace='default'
# The parser is a module-level function called by Request._parse, so it is wrapped (idempotent).
# ---------------------------------------------------------------------------------------------
def _fixed_parse_path(path: str, _orig=parsing.parse_path) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if (
        len(parts) >= 3
        and parts[0] == "api"
        and parts[2] == "namespaces"
        and (len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize")))
    ):
        return parsing.ParsedPath(
            group="",
            version=parts[1],
            plural="namespaces",
            namespace=None,
            name=parts[3] if len(parts) >= 4 else None,
            subresource=parts[4] if len(parts) == 5 else None,
        )
    return _orig(path)


def install_namespaces_path_fix() -> None:
    """Process-wide & idempotent; called by RealisticEmulator() automatically."""
    if not getattr(parsing.parse_path, "_namespaces_fixed", False):
        _fixed_parse_path._namespaces_fixed = True  # type: ignore[attr-defined]
        parsing.parse_path = _fixed_parse_path


# ---------------------------------------------------------------------------------------------
# Selectors (labelSelector= & fieldSelector= on list/watch): absent in KMock 0.8.
# ---------------------------------------------------------------------------------------------
_SET_RE = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")


def _split_selector(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


def match_label_selector(labels: Mapping[str, str], selector: str) -> bool:
    for term in _split_selector(selector):
        if m := _EQ_RE.match(term):
            key, op, val = m.groups()
            ok = labels.get(key) == val if op in ("=", "==") else labels.get(key) != val
        elif m := _SET_RE.match(term):
            neg, key, op, vals = m.groups()
            values = {v.strip() for v in (vals or "").split(",") if v.strip()}
            if op == "in":
                ok = key in labels and labels[key] in values
            elif op == "notin":
                ok = key not in labels or labels[key] not in values
            else:
                ok = (key not in labels) if neg else (key in labels)
        else:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"unable to parse requirement: {term!r}"
            )
        if not ok:
            return False
    return True


def match_field_selector(obj: Mapping[str, Any], selector: str) -> bool:
    for term in _split_selector(selector):
        m = _EQ_RE.match(term)
        if not m:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"invalid field selector: {term!r}"
            )
        path, op, val = m.groups()
        cur: Any = obj
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        cur = "" if cur is None else str(cur)
        if (cur == val) != (op in ("=", "==")):
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(body: Mapping[str, Any], path: str) -> Any:
    """The value at a JSON path like `.spec.replicas`, or None."""
    cursor: Any = body
    for part in path.strip(".").split("."):
        cursor = cursor.get(part) if isinstance(cursor, Mapping) else None
    return cursor


# ---------------------------------------------------------------------------------------------
# Server-side printing (`kubectl get` asks for `application/json;as=Table;v=v1;g=meta.k8s.io`):
# KMock answers plain objects, and kubectl then shows only NAME and AGE. A CRD's
# additionalPrinterColumns are read from the repository's CRD files.
# ---------------------------------------------------------------------------------------------
def _wants_table(request: rendering.Request) -> bool:
    accept = str(request.headers.get("Accept", ""))
    return "as=Table" in accept and request.resource is not None


def _printer_columns(plural: str) -> list[dict[str, Any]]:
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd.get("spec", {}).get("names", {}).get("plural") == plural:
            return list(crd["spec"]["versions"][0].get("additionalPrinterColumns", []))
    return [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def _table(request: rendering.Request, items: list[dict[str, Any]], rv: str) -> dict[str, Any]:
    columns = _printer_columns(request.resource.plural)
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0}] + [
        {
            "name": c["name"],
            "type": c["type"],
            "format": "",
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for item in items:
        meta = item.get("metadata", {})
        cells: list[Any] = [meta.get("name")]
        for column in columns:
            value = _at(item, column["jsonPath"])
            if column["type"] == "date" and isinstance(value, str):
                value = _age(value)
            cells.append(value if value is not None else "")
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _age(timestamp: str) -> str:
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return timestamp
    seconds = int((datetime.datetime.now(tz=datetime.UTC) - then).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def _essence(body: Mapping[str, Any], *, has_status: bool) -> dict[str, Any]:
    """What bumps metadata.generation: everything but metadata (and status, if a subresource)."""
    return {k: v for k, v in body.items() if k != "metadata" and not (has_status and k == "status")}


CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
# Resources with a scale subresource: (group, plural) -> (spec, status, selector) replica paths.
SCALE_PATHS = {
    ("modelloader.dev", "loadedmodels"): (".spec.replicas", ".status.replicas", ".status.selector")
}


@attrs.define(kw_only=True)
class RealisticEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator + the API-server semantics that kopf depends on."""

    event_log_size: int = 10_000
    _rv_counter: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _last_rv: int = attrs.field(default=999, init=False)
    # per-resource (rv, event) log for resuming watches from ?resourceVersion=N (+ the floor for 410 Gone).
    _event_log: dict[Any, collections.deque] = attrs.field(factory=dict, init=False)
    _log_floor: dict[Any, int] = attrs.field(factory=dict, init=False)
    _results: dict[int, Any] = attrs.field(factory=dict, init=False)
    # Every request as (method, path, query, user agent), in arrival order: what a client asked
    # of the API, for tests that check RBAC rules against real traffic (tests/integration/test_rbac.py).
    requests: list[tuple[str, str, dict[str, str], str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        install_namespaces_path_fix()
        # PUT (replace, e.g. `kubectl replace`) has no K8s action in KMock: serve it like a PATCH.
        self.fallback[enums.method.PUT] << self._serve_stashed

    # ----- bookkeeping -------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._last_rv = next(self._rv_counter)
        return str(self._last_rv)

    def _info(self, resource: references.resource) -> references.ResourceInfo | None:
        return self.resources[resource] if resource in self.resources else None

    async def _emit(self, resource: references.resource, type_: str, raw: dict[str, Any]) -> None:
        event = {"type": type_, "object": copy.deepcopy(raw)}
        log = self._event_log.setdefault(resource, collections.deque())
        log.append((int(raw["metadata"]["resourceVersion"]), event))
        while len(log) > self.event_log_size:
            rv, _ = log.popleft()
            self._log_floor[resource] = rv
        await self._buses[resource].put(event)

    async def _adopt_unstamped(self) -> None:
        """Objects put directly into `emu.objects[...]` get uid/resourceVersion/etc. lazily."""
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted or obj.get("metadata", {}).get("resourceVersion"):
                continue
            body = copy.deepcopy(obj.raw)
            meta = body.setdefault("metadata", {})
            meta.setdefault("name", name)
            if namespace is not None:
                meta.setdefault("namespace", namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self._next_rv()
            obj.history[-1] = body  # in place: not a new version in the history
            await self._emit(resource, "ADDED", body)

    # ----- the mutating entry point (replaces the base class's simplistic one) -----------------
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.requests.append(
            (
                str(getattr(request.method, "value", request.method)),
                request.url.path,
                dict(request.params),
                str(request.headers.get("User-Agent", "")),
            )
        )
        listed = self._resource_list(request.url.path) if request.method == "GET" else None
        if listed is not None:
            return aiohttp.web.json_response(listed)
        if request.resource is None:
            return await super()._handle(request)

        is_put = request.method == enums.method.PUT and request.name is not None
        mutating = (
            request.action == enums.action.CREATE
            or is_put
            or (
                request.action in (enums.action.UPDATE, enums.action.DELETE)
                and request.name is not None
            )
        )
        async with self._lock:
            await self._adopt_unstamped()
            if request.subresource == "scale":
                self._results[id(request)] = await self._scale(request, mutating, is_put)
            elif mutating:
                if request.action == enums.action.CREATE:
                    result = await self._do_create(request)
                elif request.action == enums.action.DELETE:
                    result = await self._do_delete(request)
                else:
                    result = await self._do_patch(request, replace=is_put)
                self._results[id(request)] = result
        try:
            # Skip KubernetesEmulator._handle (its mutation logic); go to reactions/fallbacks directly.
            return await apps.RawHandler._handle(self, request)
        finally:
            self._results.pop(id(request), None)

    def _resource_list(self, path: str) -> dict[str, Any] | None:
        """A group version's APIResourceList as the API server writes it. KMock's names the
        core group "/v1" (kubectl then finds no Namespace or Secret kind) and gives
        subresources their resource's short names (kubectl warns that `lm` is ambiguous)."""
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"]:
            group_version = "v1"
        elif len(parts) == 3 and parts[0] == "apis":
            group_version = f"{parts[1]}/{parts[2]}"
        else:
            return None
        listed: list[dict[str, Any]] = []
        for resource in self._get_resources():
            info, plural = self._resources[resource], resource.plural
            group = f"{resource.group}/" if resource.group else ""
            if f"{group}{resource.version}" != group_version or plural is None:
                continue
            listed.append(
                {
                    "name": plural,
                    "singularName": info.singular,
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": sorted(str(v) for v in info.verbs),
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                entry = {
                    "name": f"{plural}/{sub}",
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": ["get", "patch", "update"],
                }
                if sub == "scale":
                    entry.update(group="autoscaling", version="v1", kind="Scale")
                listed.append(entry)
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": listed,
        }

    async def _serve_stashed(self, request: rendering.Request) -> Any:
        return self._results[id(request)]

    _serve_create = _serve_update = _serve_delete = _serve_stashed

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        if id(request) in self._results:  # a subresource made here (scale)
            return self._results[id(request)]
        found = await super()._serve_fetch(request)
        if _wants_table(request):
            return _table(request, [found], found.get("metadata", {}).get("resourceVersion", ""))
        return found

    # ----- the scale subresource (`kubectl scale`, an HPA): autoscaling/v1 Scale ---------------

    def _scale_paths(self, request: rendering.Request) -> tuple[str, str, str]:
        found = SCALE_PATHS.get((request.resource.group, request.resource.plural))
        if found is None:
            raise kmock.KubernetesError(
                status=404,
                reason="NotFound",
                message="the server could not find the requested resource",
            )
        return found

    def _scale_of(self, request: rendering.Request, body: Mapping[str, Any]) -> dict[str, Any]:
        spec_path, status_path, selector_path = self._scale_paths(request)
        meta = body.get("metadata", {})
        spec_replicas = _at(body, spec_path)
        if spec_replicas is None:
            # As apiextensions-apiserver: no value at specReplicasPath is an error on GET.
            raise kmock.KubernetesError(
                status=500,
                reason="InternalError",
                message=f"the spec replicas field {spec_path!r} does not exist",
            )
        status: dict[str, Any] = {"replicas": int(_at(body, status_path) or 0)}
        if (selector := _at(body, selector_path)) is not None:
            status["selector"] = selector
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": int(spec_replicas)},
            "status": status,
        }

    async def _scale(
        self, request: rendering.Request, mutating: bool, replace: bool
    ) -> dict[str, Any]:
        _, obj = self._get_live(request)
        if not mutating:
            return self._scale_of(request, obj.raw)
        data = request.data
        if not isinstance(data, Mapping):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="a Scale object is required"
            )
        spec = data.get("spec") if isinstance(data.get("spec"), Mapping) else {}
        replicas = spec.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message="spec.replicas: Invalid value: must be a non-negative integer",
            )
        spec_path = self._scale_paths(request)[0]
        patch: dict[str, Any] = {}
        cursor = patch
        parts = spec_path.strip(".").split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = replicas
        new = await self._do_patch(request, replace=False, data=patch, subresource=None)
        return self._scale_of(request, new)

    async def _do_create(self, request: rendering.Request) -> dict[str, Any]:
        resource = request.resource
        info = self._info(resource)
        body = copy.deepcopy(request.data) if isinstance(request.data, Mapping) else {}
        meta = body.setdefault("metadata", {})
        namespaced = (
            info.namespaced
            if info is not None and info.namespaced is not None
            else request.namespace is not None
        )
        if namespaced:
            if (
                request.namespace
                and meta.get("namespace")
                and meta["namespace"] != request.namespace
            ):
                raise kmock.KubernetesError(
                    status=400,
                    reason="BadRequest",
                    message="the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message="metadata.name: Required value: name or generateName is required",
                )
            meta["name"] = meta["generateName"] + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5)
            )
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(
                status=409,
                reason="AlreadyExists",
                message=f'{resource.plural} "{meta["name"]}" already exists',
            )
        if info is not None and "status" in info.subresources:
            body.pop("status", None)  # the real API drops status on create when it is a subresource
        if info is not None and info.kind and "kind" not in body:
            body["kind"] = info.kind
        if "apiVersion" not in body:
            body["apiVersion"] = (
                f"{resource.group}/{resource.version}" if resource.group else resource.version
            )
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv()
        if key in self.objects:
            self.objects[key].create(body)  # re-creation after soft-deletion: continue the history
        else:
            self.objects[key] = body
        await self._emit(resource, "ADDED", body)
        return body

    def _get_live(self, request: rendering.Request) -> tuple[Any, Any]:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesError(
                status=404,
                reason="NotFound",
                message=f'{request.resource.plural} "{request.name}" not found',
                details={"name": request.name, "kind": request.resource.plural},
            )
        return key, self.objects[key]

    async def _do_patch(
        self,
        request: rendering.Request,
        *,
        replace: bool,
        data: Any = None,
        subresource: str | None = "",
    ) -> dict[str, Any]:
        """A PATCH or PUT; `data` and `subresource` override the request's (the scale
        subresource patches the main object with a merge patch of its own)."""
        key, obj = self._get_live(request)
        info = self._info(request.resource)
        has_status = info is not None and "status" in info.subresources
        old = copy.deepcopy(obj.raw)
        old_meta = old.get("metadata", {})
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if data is None:
            data = request.data
        else:
            ctype = "application/merge-patch+json"
        if subresource == "":
            subresource = request.subresource

        try:
            if replace:
                if not isinstance(data, Mapping):
                    raise kmock.KubernetesError(
                        status=400, reason="BadRequest", message="PUT needs an object"
                    )
                new = copy.deepcopy(dict(data))
                sent_rv = new.get("metadata", {}).get("resourceVersion")
            elif ctype == "application/json-patch+json" or isinstance(data, list):
                new = jsonpatch.apply_patch(copy.deepcopy(old), data, in_place=False)
                sent_rv = (
                    None  # optimistic concurrency is done via the "test" op, which is now applied
                )
            elif ctype in ("application/apply-patch+yaml", "application/apply-patch+json"):
                raise kmock.KubernetesError(
                    status=415,
                    reason="UnsupportedMediaType",
                    message="server-side apply is not emulated",
                )
            elif ctype == "application/strategic-merge-patch+json" and request.resource.group:
                raise kmock.KubernetesError(
                    status=415,
                    reason="UnsupportedMediaType",
                    message="strategic merge patch is not supported for custom resources",
                )
            elif isinstance(data, Mapping):
                new = dicts.merge_patch_dict(old, data)  # RFC 7386: null deletes, lists replace
                sent_rv = (
                    data.get("metadata", {}).get("resourceVersion")
                    if isinstance(data.get("metadata"), Mapping)
                    else None
                )
            else:
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message="unsupported patch payload"
                )
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            # kopf relies on this: a failed {"op":"test","path":"/metadata/resourceVersion"} => 422.
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message=f"the server rejected our request: {e}"
            )

        if sent_rv is not None and str(sent_rv) != str(old_meta.get("resourceVersion")):
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message=f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": '
                "the object has been modified; please apply your changes to the latest version and try again",
            )

        # The status subresource splits what each endpoint can change (as in apiextensions-apiserver).
        if subresource == "status":
            new = (
                {**old, "status": new.get("status")}
                if new.get("status") is not None
                else {k: v for k, v in old.items() if k != "status"}
            )
        elif subresource is None and has_status:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)

        # Server-owned metadata cannot be changed by clients.
        meta = new.setdefault("metadata", {})
        for k in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
        ):
            if k in old_meta:
                meta[k] = old_meta[k]
            else:
                meta.pop(k, None)
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers", [])) - set(
            old_meta.get("finalizers", [])
        ):
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message="metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
            )
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)

        if new == old:
            return old  # a no-op patch: no new resourceVersion, no watch-event (as in the real API)

        if _essence(new, has_status=has_status) != _essence(old, has_status=has_status):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()

        obj.history.append(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            obj.delete()  # the last finalizer is gone from a deleted object: it is really deleted now
            await self._emit(request.resource, "DELETED", new)
        else:
            await self._emit(request.resource, "MODIFIED", new)
        return new

    async def _do_delete(self, request: rendering.Request) -> dict[str, Any]:
        key, obj = self._get_live(request)
        body = copy.deepcopy(obj.raw)
        meta = body.setdefault("metadata", {})
        if meta.get("deletionTimestamp"):
            return body  # already being deleted; nothing changes
        if meta.get("finalizers"):
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            meta["generation"] = int(meta.get("generation", 1)) + 1
            meta["resourceVersion"] = self._next_rv()
            obj.history.append(body)
            await self._emit(request.resource, "MODIFIED", body)
        else:
            meta["resourceVersion"] = self._next_rv()
            obj.history.append(body)
            obj.delete()
            await self._emit(request.resource, "DELETED", body)
        return body

    # ----- reading: list & watch with resourceVersion/selectors -----------------------------------
    def _selected(
        self,
        request: rendering.Request,
        resource: Any,
        namespace: str | None,
        raw: Mapping[str, Any],
    ) -> bool:
        if resource != request.resource:
            return False
        if request.namespace is not None and namespace != request.namespace:
            return False
        if request.name is not None and raw.get("metadata", {}).get("name") != request.name:
            return False
        if (ls := request.params.get("labelSelector")) and not match_label_selector(
            raw.get("metadata", {}).get("labels") or {}, ls
        ):
            return False
        if (fs := request.params.get("fieldSelector")) and not match_field_selector(raw, fs):
            return False
        return True

    async def _serve_list(self, request: rendering.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            await self._adopt_unstamped()
            items = [
                copy.deepcopy(obj.raw)
                for (res, ns, _), obj in self.objects.items()
                if not obj.deleted and self._selected(request, res, ns, obj.raw)
            ]
            rv = str(self._last_rv)
        info = self._info(request.resource)
        gv = (
            f"{request.resource.group}/{request.resource.version}"
            if request.resource.group
            else request.resource.version
        )
        if _wants_table(request):
            return _table(request, items, rv)
        return {
            "apiVersion": gv,
            "kind": f"{(info.kind if info and info.kind else '')}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        yield b""  # flush the headers, as the base class does
        resource = request.resource
        bus = self._buses[resource]
        since_s = request.params.get("resourceVersion")
        async with self._lock:
            await self._adopt_unstamped()
            marker = (
                await bus.mark()
            )  # under the lock: no event can slip between the replay & the bus
            if since_s and since_s != "0":
                since = int(since_s)
                if since < self._log_floor.get(resource, 0):
                    backlog = [
                        {
                            "type": "ERROR",
                            "object": {
                                "apiVersion": "v1",
                                "kind": "Status",
                                "status": "Failure",
                                "code": 410,
                                "reason": "Expired",
                                "message": f"too old resource version: {since}",
                            },
                        }
                    ]
                else:
                    backlog = [ev for rv, ev in self._event_log.get(resource, ()) if rv > since]
            else:
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (res, ns, _), obj in self.objects.items()
                    if res == resource and not obj.deleted
                ]
        try:
            for event in backlog:
                if event["type"] == "ERROR":
                    yield event
                    return
                obj = event["object"]
                if self._selected(request, resource, obj.get("metadata", {}).get("namespace"), obj):
                    yield event
            async for event in bus.stream(since=marker):
                obj = event["object"]
                if self._selected(request, resource, obj.get("metadata", {}).get("namespace"), obj):
                    yield event
        finally:
            await bus.unmark(marker)


# One line per shortfall of the vanilla KubernetesEmulator (KMock 0.8) that this class fixes.
EXTENSIONS = [
    'resourceVersion: never set by KMock; kopf JSON-patches finalizers with {"op":"test","path":"/metadata/resourceVersion"} and waits consistency_timeout for the patched version to arrive via watch.',
    'JSON-patch "test" failures: KMock answers 500 (kopf retries with backoff); the real API answers 422 which kopf treats as "conflict, retry next cycle".',
    "uid/creationTimestamp/generation: never set; operators/kopf events use uid, status.observedGeneration needs generation.",
    'metadata.namespace: not filled from the URL on POST (kubectl-style bodies lack it); kopf then fails every cycle with ValueError("Specific namespaces are required for specific namespaced resources.").',
    "generateName: unsupported; kopf posts every k8s Event with generateName, the 2nd one gets 409 (the 1st is stored with name=None).",
    "status subresource: PATCH .../status and PATCH on the main endpoint both merge everything; real API splits status vs the rest, drops status on create.",
    "no-op patches: KMock emits MODIFIED for every PATCH even without changes; the real API does not (avoids extra kopf cycles).",
    "watch ?resourceVersion=N: ignored; KMock re-sends all objects as ADDED and can lose events between the replay and the bus subscription.",
    "DELETED events & deletions: KMock keeps the old resourceVersion on DELETED and on the deletionTimestamp update.",
    'list: metadata.resourceVersion is the literal "..." and kind/apiVersion are missing; kopf resumes the watch from that version.',
    "labelSelector / fieldSelector on list & watch: ignored by KMock.",
    "PUT (replace): not handled by KMock at all (404 Endpoint Not Found).",
    "Conflict on stale metadata.resourceVersion in a merge-patch/PUT body: KMock never returns 409.",
    "KMock bug: /api/v1/namespaces[/name] is mis-parsed (500 on list/watch); kopf needs it when serving specific namespaces (not clusterwide).",
    "Finalizers cannot be added to an object being deleted (422), as in the real API.",
    "The scale subresource (GET/PATCH/PUT .../scale as an autoscaling/v1 Scale, mapped onto the resource's spec and status paths): not emulated by KMock.",
    "Server-side printing: `kubectl get` asks for a meta.k8s.io/v1 Table (the CRD's additionalPrinterColumns); KMock answers plain objects, so kubectl shows NAME and AGE only.",
]
