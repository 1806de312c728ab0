"""The gateway's OpenAPI 3 description, served at `GET /v2/openapi.json`.

A static document of the v2 REST routes with JSON tensors. Triton's binary tensor extension
(`application/octet-stream` bodies with `Inference-Header-Content-Length`) is described in
words only: its layout is beyond what a schema can say. Fuzzers use this document
(tests/e2e/test_hostile_requests.py), so every status the gateway may answer is listed.
"""

from __future__ import annotations

from typing import Any

_DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        out["headers"] = headers
    return out


_UNAUTHORIZED = _error(
    "no valid bearer token where the origin needs one",
    {"WWW-Authenticate": {"schema": {"type": "string"}}},
)
_NOT_FOUND = _error("unknown model or version, or another origin's model")
_ERRORS = {"401": _UNAUTHORIZED, "404": _NOT_FOUND}

_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "example": "digits",
}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "example": "1",
}

_TENSOR_DATA = {
    "description": "the tensor's values, flat or nested, in row-major order",
    "type": "array",
    "items": {},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Parameters": {"type": "object", "additionalProperties": True},
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": _DATATYPES},
            "parameters": _ref("Parameters"),
            "data": _TENSOR_DATA,
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _ref("Parameters")},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "inputs": {"type": "array", "minItems": 1, "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": _ref("Parameters"),
            "data": _TENSOR_DATA,
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    # Triton's model configuration extension (the fields Model Loader fills in).
    "ModelConfig": {
        "type": "object",
        "required": ["name", "platform", "max_batch_size", "input", "output"],
        "properties": {
            "name": {"type": "string"},
            "platform": {"type": "string"},
            "backend": {"type": "string"},
            "max_batch_size": {"type": "integer", "minimum": 0},
            "input": {"type": "array", "items": _ref("ConfigTensor")},
            "output": {"type": "array", "items": _ref("ConfigTensor")},
            "instance_group": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "count": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    },
    "ConfigTensor": {
        "type": "object",
        "required": ["name", "data_type", "dims"],
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string"},
            "dims": {"type": "array", "items": {"type": "integer"}},
        },
    },
    # Triton's statistics extension.
    "ModelStatistics": {
        "type": "object",
        "required": ["model_stats"],
        "properties": {
            "model_stats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "last_inference": {"type": "integer"},
                        "inference_count": {"type": "integer"},
                        "execution_count": {"type": "integer"},
                        "inference_stats": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {
                                    "count": {"type": "integer"},
                                    "ns": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
            }
        },
    },
}


def _model_operations(versioned: bool) -> dict[str, Any]:
    params = [_NAME, _VERSION] if versioned else [_NAME]
    suffix = "Version" if versioned else ""
    infer_responses = {
        "200": {
            "description": "the outputs (JSON; with the binary extension, a JSON header then "
            "raw tensors, `application/octet-stream`)",
            "content": _json(_ref("InferenceResponse")),
        },
        "400": _error(
            "malformed body; wrong datatype or shape; missing, extra or repeated input; "
            "unknown output"
        ),
        **_ERRORS,
        "408": _error("the body did not arrive within the gateway's body timeout"),
        "413": _error("the body is over the gateway's limit (--max-request-bytes)"),
        "429": _error(
            "over the origin's request rate or concurrency",
            {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
        ),
        "503": _error("the model is not ready: loading, failed, or waiting for capacity"),
    }
    base = "/v2/models/{name}" + ("/versions/{version}" if versioned else "")
    return {
        base: {
            "get": {
                "operationId": f"modelMetadata{suffix}",
                "summary": "the model's inputs and outputs",
                "parameters": params,
                "responses": {
                    "200": {"description": "metadata", "content": _json(_ref("ModelMetadata"))},
                    **_ERRORS,
                    "503": _error("the model is not ready"),
                },
            }
        },
        base + "/ready": {
            "get": {
                "operationId": f"modelReady{suffix}",
                "summary": "whether the model serves",
                "parameters": params,
                "responses": {
                    "200": {"description": "ready", "content": _json(_ref("ModelReady"))},
                    **_ERRORS,
                    "503": {"description": "not ready", "content": _json(_ref("ModelReady"))},
                },
            }
        },
        base + "/config": {
            "get": {
                "operationId": f"modelConfig{suffix}",
                "summary": "what the model is: inputs, outputs, batching, instances (Triton's "
                "model configuration extension)",
                "parameters": params,
                "responses": {
                    "200": {"description": "configuration", "content": _json(_ref("ModelConfig"))},
                    **_ERRORS,
                    "503": _error("the model is not ready"),
                },
            }
        },
        base + "/stats": {
            "get": {
                "operationId": f"modelStatistics{suffix}",
                "summary": "the model's request counts and times (Triton's statistics extension)",
                "parameters": params,
                "responses": {
                    "200": {
                        "description": "statistics",
                        "content": _json(_ref("ModelStatistics")),
                    },
                    **_ERRORS,
                },
            }
        },
        base + "/infer": {
            "post": {
                "operationId": f"infer{suffix}",
                "summary": "run the model once",
                "description": "JSON tensors as below. Triton's binary tensor extension: "
                "an `Inference-Header-Content-Length` header gives the length of the JSON "
                "header, raw little-endian tensors follow, each input declaring its size in "
                "`parameters.binary_data_size`.",
                "parameters": params,
                "requestBody": {"required": True, "content": _json(_ref("InferenceRequest"))},
                "responses": infer_responses,
            }
        },
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Model Loader gateway: Open Inference Protocol v2",
        "version": "1",
        "description": 'KServe v2 REST. Every error is `{"error": reason}`. A bearer token '
        "(`Authorization: Bearer <token>`) selects the caller's origin where tokens are "
        "required.",
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{}, {"bearer": []}],
    "paths": {
        "/v2": {
            "get": {
                "operationId": "serverMetadata",
                "security": [],
                "responses": {
                    "200": {"description": "server", "content": _json(_ref("ServerMetadata"))}
                },
            }
        },
        "/v2/health/live": {
            "get": {
                "operationId": "serverLive",
                "security": [],
                "responses": {"200": {"description": "live", "content": _json(_ref("Live"))}},
            }
        },
        "/v2/health/ready": {
            "get": {
                "operationId": "serverReady",
                "security": [],
                "responses": {
                    "200": {"description": "ready", "content": _json(_ref("Ready"))},
                    "503": {"description": "not yet", "content": _json(_ref("Ready"))},
                },
            }
        },
        "/v2/openapi.json": {
            "get": {
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": {
                        "description": "this document",
                        "content": _json({"type": "object"}),
                    }
                },
            }
        },
        "/v2/models/stats": {
            "get": {
                "operationId": "allModelStatistics",
                "summary": "statistics of every model the caller may use",
                "responses": {
                    "200": {
                        "description": "statistics",
                        "content": _json(_ref("ModelStatistics")),
                    },
                    "401": _UNAUTHORIZED,
                },
            }
        },
        **_model_operations(versioned=False),
        **_model_operations(versioned=True),
    },
}
