"""Pure parts of the cluster mode: the operator's desired state, the gateway's directory."""

from __future__ import annotations

from typing import Any

from modelloader.cluster_gateway import directory_entries
from modelloader.operator_main import desired
from modelloader_workers.worker import LoadedInfo


def body(name: str, created: str, namespace: str = "team", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "LoadedModel",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": created,
            "generation": 3,
        },
        "spec": {"source": {"uri": "https://models.example/m.tflite"}, **spec},
    }


def test_desired_is_oldest_first_and_rejects_invalid_specs() -> None:
    models, rejected = desired(
        [
            body("b", "2026-01-02T00:00:00Z"),
            body("a", "2026-01-01T00:00:00Z"),
            body("bad", "2026-01-01T00:00:00Z", accelerator="tpu"),
        ]
    )
    assert [m.name for m in models] == ["a", "b"]
    assert models[0].generation == 3 and models[0].spec.origin == "team"
    assert rejected[0].name == "bad" and rejected[0].message.startswith("spec.accelerator")


def info(origin: str, key: str, generation: int, address: str) -> LoadedInfo:
    return LoadedInfo(
        signature={"inputs": [], "outputs": []},
        load_seconds=0.1,
        address=address,
        pid=1,
        node_id="n",
        host="h",
        accelerator="cpu",
        delegate="xnnpack",
        delegated_ops_share=1.0,
        note="",
        identity={"key": key, "origin": origin, "fingerprint": "f", "generation": generation},
    )


def test_gateway_routes_to_the_newest_generation_per_origin() -> None:
    entries = directory_entries(
        [
            info("a", "ns/m", 1, "unix:/old"),
            info("a", "ns/m", 2, "unix:/new"),
            info("b", "other/m", 1, "unix:/b"),
        ]
    )
    routes = {(e.origin, e.name): e.address for e in entries}
    assert routes == {("a", "m"): "unix:/new", ("b", "m"): "unix:/b"}


def test_delegate_flags() -> None:
    import pytest
    from modelloader.cli import parse_delegate
    from modelloader_workers.litert_runner import ExternalDelegate

    assert parse_delegate("npu=/usr/lib/libedgetpu.so.1:device=usb,x=1") == (
        "npu",
        ExternalDelegate("/usr/lib/libedgetpu.so.1", (("device", "usb"), ("x", "1"))),
    )
    assert parse_delegate("gpu=/opt/libgpu.so") == ("gpu", ExternalDelegate("/opt/libgpu.so"))
    with pytest.raises(SystemExit):
        parse_delegate("tpu=/x.so")


def test_every_subcommand_is_registered() -> None:
    import subprocess
    import sys
    from pathlib import Path

    binary = Path(sys.executable).parent / "modelloader"
    for command in ("local", "status", "operator", "gateway"):
        done = subprocess.run([str(binary), command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and f"modelloader {command}" in done.stdout, done.stderr
