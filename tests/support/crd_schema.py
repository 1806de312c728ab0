"""The repository's CRDs as JSON Schema validators, for tests that check documents against
them (the API server's structural checks; CEL rules are the API server's alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"


def crd_schema(name: str) -> dict[str, Any]:
    """The openAPIV3Schema of `crds/<name>`'s first version."""
    crd = yaml.safe_load((CRDS / name).read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def json_schema(node: Any) -> Any:
    """A CRD's OpenAPI schema as JSON Schema: the x-kubernetes-* extensions mean nothing there."""
    if isinstance(node, dict):
        return {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    return node


def crd_validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json_schema(crd_schema(name)))
