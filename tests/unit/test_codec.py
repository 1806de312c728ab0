"""v2 request/response bodies: JSON tensors, Triton's binary extension, and 400s with reasons."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from modelloader_gateway.codec import decode_request, encode_response
from modelloader_gateway.errors import BadRequest
from modelloader_workers.wire.signature import (
    InvalidRequest,
    Signature,
    TensorSpec,
    check_inputs,
    check_outputs,
)


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_json_tensors_of_each_type() -> None:
    request = decode_request(
        body(
            {
                "id": "7",
                "inputs": [
                    {"name": "f", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
                    {"name": "h", "datatype": "FP16", "shape": [1], "data": [0.5]},
                    {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                    {"name": "i", "datatype": "INT64", "shape": [1], "data": [2**40]},
                ],
            }
        ),
        None,
    )
    assert request.id == "7"
    assert request.inputs["f"].dtype == np.float32
    assert request.inputs["f"].tolist() == [[1, 2], [3, 4]]
    assert request.inputs["h"].dtype == np.float16
    assert request.inputs["b"].tolist() == [True, False]
    assert request.inputs["i"].tolist() == [2**40]
    assert request.outputs == [] and request.binary_default is False


def test_binary_inputs_and_outputs() -> None:
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    b = np.array([1.5, -2.0], dtype=np.float32)
    header = body(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "UINT8",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": a.nbytes},
                },
                {
                    "name": "b",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": b.nbytes},
                },
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    )
    request = decode_request(header + a.tobytes() + b.tobytes(), str(len(header)))
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.binary_outputs == {"y": True, "z": False}

    y = np.array([[1.0, 2.0]], np.float32)
    z = np.array([True, False])
    payload, header_length = encode_response("m", "1", request, {"y": y, "z": z})
    assert header_length is not None
    response = json.loads(payload[:header_length])
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert response["outputs"][1]["data"] == [True, False]
    np.testing.assert_array_equal(np.frombuffer(payload[header_length:], np.float32), y.ravel())


def test_all_json_response_has_no_header_length() -> None:
    request = decode_request(
        body({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}), None
    )
    payload, header_length = encode_response("m", "1", request, {"y": np.array([3], np.int8)})
    assert header_length is None
    assert json.loads(payload)["outputs"] == [
        {"name": "y", "datatype": "INT8", "shape": [1], "data": [3]}
    ]


@pytest.mark.parametrize(
    ("raw", "length", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (body([1, 2]), None, "JSON object"),
        (body({"inputs": []}), None, "non-empty list"),
        (
            body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}),
            None,
            "has 1 values but shape [2] needs 2",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}]}),
            None,
            "unsupported datatype",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
            None,
            "unsupported datatype",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}),
            None,
            "non-negative integers",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}),
            None,
            "does not hold FP32",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}),
            None,
            "does not hold UINT8",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}),
            None,
            "neither 'data' nor binary",
        ),
        (
            body(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                    ]
                }
            ),
            None,
            "given twice",
        ),
        (
            body(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [2],
                            "parameters": {"binary_data_size": 4},
                        }
                    ]
                }
            ),
            "_",
            "do not fit",
        ),
        (
            body(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [1],
                            "parameters": {"binary_data_size": 4},
                        }
                    ]
                }
            ),
            "_",
            "body ends",
        ),
        (
            body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}),
            "9999",
            "outside the body",
        ),
        (
            body(
                {
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                    "outputs": [{"name": "y", "parameters": {"classification": 2}}],
                }
            ),
            None,
            "classification",
        ),
    ],
)
def test_malformed_bodies_are_400_with_a_reason(
    raw: bytes, length: str | None, needle: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_request(raw, str(len(raw)) if length == "_" else length)
    assert needle in caught.value.message
    assert isinstance(caught.value, BadRequest)


def test_trailing_binary_data_nobody_claims() -> None:
    header = body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
    with pytest.raises(BadRequest, match="no input claims"):
        decode_request(header + b"\0\0\0\0", str(len(header)))


SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT32", (1,))),
    outputs=(TensorSpec("y", "FP32", (-1,)),),
)


def test_signature_accepts_dynamic_dimensions() -> None:
    check_inputs(SIGNATURE, {"x": ("FP32", (5, 3)), "k": ("INT32", (1,))})
    check_outputs(SIGNATURE, ["y"])


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ({"x": ("FP32", (5, 3))}, "missing input 'k'"),
        (
            {"x": ("FP32", (5, 3)), "k": ("INT32", (1,)), "z": ("FP32", (1,))},
            "unexpected input 'z'",
        ),
        ({"x": ("FP16", (5, 3)), "k": ("INT32", (1,))}, "datatype FP16"),
        ({"x": ("FP32", (5, 4)), "k": ("INT32", (1,))}, "shape [5, 4]"),
        ({"x": ("FP32", (3,)), "k": ("INT32", (1,))}, "shape [3]"),
    ],
)
def test_signature_mismatches(given: dict[str, tuple[str, tuple[int, ...]]], needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_inputs(SIGNATURE, given)


def test_unknown_output() -> None:
    with pytest.raises(InvalidRequest, match="unknown output 'q'"):
        check_outputs(SIGNATURE, ["q"])


@pytest.mark.parametrize("datatype", ["UINT8", "INT8", "INT16", "UINT16", "INT32", "UINT32"])
def test_json_integer_tensors_decode_exactly_and_refuse_values_out_of_range(
    datatype: str,
) -> None:
    from modelloader_workers.wire.tensor_types import numpy_dtype

    dtype = numpy_dtype(datatype)
    limits = np.iinfo(dtype)
    values = [int(limits.min), 0, int(limits.max)]
    request = decode_request(
        body({"inputs": [{"name": "x", "datatype": datatype, "shape": [3], "data": values}]}),
        None,
    )
    assert request.inputs["x"].dtype == dtype and request.inputs["x"].tolist() == values
    for bad in (int(limits.max) + 1, int(limits.min) - 1):
        with pytest.raises(BadRequest, match=f"does not hold {datatype} values"):
            decode_request(
                body(
                    {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [bad]}]}
                ),
                None,
            )
    with pytest.raises(BadRequest, match=f"does not hold {datatype} values"):
        decode_request(
            body({"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": ["a"]}]}),
            None,
        )


def test_json_image_sized_tensors_decode_like_the_array_and_outputs_round_trip() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    nested = {"name": "n", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": image.tolist()}
    flat = {"name": "f", "datatype": "FP32", "shape": [4], "data": [0.1, -2.5, 3e38, 1e-8]}
    request = decode_request(body({"inputs": [nested, flat]}), None)
    np.testing.assert_array_equal(request.inputs["n"], image)
    np.testing.assert_array_equal(
        request.inputs["f"], np.array([0.1, -2.5, 3e38, 1e-8], dtype=np.float32)
    )
    outputs = {"p": rng.uniform(size=(1, 1000)).astype(np.float32), "h": np.ones(2, np.float16)}
    payload, header_length = encode_response("m", "1", request, outputs)
    assert header_length is None
    answer = json.loads(payload)
    assert answer["outputs"][0]["shape"] == [1, 1000]
    np.testing.assert_array_equal(
        np.array(answer["outputs"][0]["data"], np.float32), outputs["p"].ravel()
    )
    assert answer["outputs"][1]["data"] == [1.0, 1.0]


def test_json_nan_and_infinities_in_and_out_as_python_and_triton_write_them() -> None:
    # perf_analyzer's random FP32 data holds NaN; simdjson refuses it, the standard parser
    # takes it, and outputs keep NaN and the infinities rather than turning them into null.
    text = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[NaN,Infinity,-1.5]}]}'
    request = decode_request(text, None)
    got = request.inputs["x"]
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -1.5
    outputs = {"y": np.array([np.nan, -np.inf, 2.0], np.float32), "z": np.array([1], np.int8)}
    payload, _ = encode_response("m", "1", request, outputs)
    assert b"NaN,-Infinity,2.0" in payload
    answer = json.loads(payload)
    assert answer["outputs"][1]["data"] == [1]


def test_json_parser_reuse_survives_a_document_kept_alive() -> None:
    # A failed request's traceback can keep the last document's proxies alive: the next
    # request still decodes (on a parser of its own).
    import simdjson
    from modelloader_gateway import codec

    kept = codec._parse(b'{"inputs":[{"data":[1,2]}]}')["inputs"]
    assert isinstance(kept, simdjson.Array)
    request = decode_request(
        body({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2], "data": [4, 5]}]}), None
    )
    assert request.inputs["x"].tolist() == [4, 5]
    assert kept[0]["data"].as_list() == [1, 2]
