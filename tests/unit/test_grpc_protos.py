"""The gateway's generated gRPC modules match its .proto files (tools/make_protos.py), and the
protocol's field numbers are those Triton's and KServe's clients use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modelloader_gateway.protos import inference_pb2

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_field_numbers_match_tritons_generated_client() -> None:
    import tritonclient.grpc.service_pb2 as triton

    ours = inference_pb2.DESCRIPTOR
    for name, message in ours.message_types_by_name.items():
        theirs = triton.DESCRIPTOR.message_types_by_name.get(name)
        if theirs is None:  # the configuration messages live in Triton's model_config.proto
            import tritonclient.grpc.model_config_pb2 as config

            theirs = config.DESCRIPTOR.message_types_by_name[name]
        for field in message.fields:
            assert field.name in theirs.fields_by_name, (name, field.name)
            other = theirs.fields_by_name[field.name]
            assert (field.number, field.type) == (other.number, other.type), (name, field.name)
    service = ours.services_by_name["GRPCInferenceService"]
    triton_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = triton_service.methods_by_name[method.name]
        assert method.input_type.name == other.input_type.name
        assert method.output_type.name == other.output_type.name
