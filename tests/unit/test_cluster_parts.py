"""Pure parts of the cluster mode: the operator's desired state, the command line."""

from __future__ import annotations

from typing import Any

from modelloader.operator_main import desired


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


def test_status_table_shows_ready_replicas_like_kubectl() -> None:
    from modelloader.cli import format_table

    table = format_table(
        [
            {
                "namespace": "team",
                "name": "digits",
                "origin": "team",
                "status": {"phase": "Ready", "ready": "2/3", "message": "2 of 3 replicas ready"},
            }
        ]
    )
    header, row = table.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "ORIGIN", "PHASE", "READY", "MESSAGE"]
    assert row.split()[:5] == ["team", "digits", "team", "Ready", "2/3"]
