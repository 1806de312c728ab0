"""The private channel of `modelloader local`: its server answers on threads of its own."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from modelloader import control_channel


def test_status_is_answered_while_the_event_loop_would_be_busy(tmp_path: Path) -> None:
    published = {"items": [{"name": "m"}], "errors": [], "origins": {}}
    asked = threading.Event()

    def report() -> dict[str, object]:
        asked.set()
        return published

    control_channel.prepare_state_dir(tmp_path)
    server = control_channel.ControlServer(tmp_path, report)
    try:
        socket_path = tmp_path / control_channel.SOCKET_NAME
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
        assert control_channel.fetch(tmp_path) == published
        assert asked.is_set() and control_channel.is_running(tmp_path)
        with pytest.raises(control_channel.ControlUnavailable):
            control_channel.fetch(tmp_path, "/other")  # a 404 is not JSON
    finally:
        server.close()
    assert not (tmp_path / control_channel.SOCKET_NAME).exists()
    assert not control_channel.is_running(tmp_path)


def test_status_is_encoded_as_the_standard_encoder_reads_it() -> None:
    report = {"items": [{"name": "m", "loadSeconds": 0.25, "ready": "1/1", "pid": 7}], "e": []}
    assert json.loads(control_channel.encode(report)) == report


def test_what_orjson_refuses_still_reaches_modelloader_status(tmp_path: Path) -> None:
    # A manifest file name that is not UTF-8, or a failed model's message, can hold a lone
    # surrogate; an integer past 64 bits is the other thing orjson will not write.
    report = {"items": [], "errors": ["/m/caf\udce9.yaml: not YAML"], "n": 1 << 70}
    server = control_channel.ControlServer(tmp_path, lambda: report)
    try:
        assert control_channel.fetch(tmp_path) == report
    finally:
        server.close()
