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
    """A CRD's OpenAPI schema as JSON Schema: the x-kubernetes-* extensions mean nothing there,
    and OpenAPI 3.0's boolean exclusiveMinimum/Maximum become JSON Schema's numbers."""
    if isinstance(node, dict):
        out = {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if out.get(exclusive) is True:
                out[exclusive] = out.pop(bound)
            elif out.get(exclusive) is False:
                del out[exclusive]
        return out
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    return node


def crd_validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json_schema(crd_schema(name)))


def cel_failures(name: str, doc: Any, old: Any = None) -> list[str]:
    """The messages of the CRD's CEL rules (`x-kubernetes-validations`) that `doc` breaks,
    evaluated with cel-python as the API server would (transition rules against `old`, or
    against `doc` itself when there is no old object)."""
    import celpy

    env = celpy.Environment()
    failures: list[str] = []

    def walk(schema: Any, value: Any, previous: Any) -> None:
        if not isinstance(schema, dict) or value is None:
            return
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            context = {"self": celpy.json_to_cel(value), "oldSelf": celpy.json_to_cel(previous)}
            try:
                if not bool(program.evaluate(context)):
                    failures.append(str(rule.get("message", rule["rule"])))
            except celpy.CELEvalError as error:  # the API server rejects these too
                failures.append(f"{rule['rule']}: {error}")
        if isinstance(value, dict):
            for key, child in schema.get("properties", {}).items():
                if key in value:
                    before = previous.get(key) if isinstance(previous, dict) else None
                    walk(child, value[key], before if before is not None else value[key])

    walk(crd_schema(name), doc, old if old is not None else doc)
    return failures
