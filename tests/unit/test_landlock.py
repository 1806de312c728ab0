"""Which paths a model process may still reach under Landlock (`landlock.rules`): pure, so
checked without a kernel; `tests/integration/test_model_process.py` applies them for real."""

from __future__ import annotations

from modelloader_workers import landlock
from modelloader_workers.landlock import READ, READ_FILE, READ_WRITE, WRITE_FILE, Rule


def granted(rules: list[Rule]) -> dict[str, int]:
    return {r.path: r.rights for r in rules}


def test_a_cpu_model_reads_its_model_python_and_libraries_and_writes_nothing() -> None:
    rules = granted(landlock.rules("/cache/ab/model.tflite", ["/venv", "/src"]))
    assert rules["/cache/ab/model.tflite"] == READ_FILE  # not even execute
    assert rules["/venv"] == rules["/src"] == rules["/usr"] == READ
    assert rules["/proc/self"] == READ
    assert rules["/dev/null"] == READ_FILE | WRITE_FILE
    assert (
        "/cache" not in rules and "/etc" not in rules and "/dev" not in rules and "/" not in rules
    )
    writable = [p for p, r in rules.items() if r & WRITE_FILE]
    assert writable == ["/dev/null"]


def test_an_accelerator_adds_its_devices_and_a_delegate_its_folder() -> None:
    rules = granted(
        landlock.rules(
            "/m.tflite", [], ["/opt/vendor/lib"], accelerator="gpu", devices=["/dev/nvidia0"]
        )
    )
    assert rules["/dev/nvidia0"] == READ_WRITE and rules["/sys/devices"] == READ
    assert "/dev" not in rules and "/dev/shm" not in rules and "/sys" not in rules
    assert rules["/opt/vendor/lib"] == READ


def test_the_root_and_relative_paths_grant_nothing() -> None:
    # A delegate named without a folder ("libedgetpu.so.1") has "." for its folder; a
    # `python -m` run from "/" has "/" on its path: either would open everything.
    rules = granted(landlock.rules("/m.tflite", ["/", "/venv/"], [".", "lib", "//"]))
    assert not [p for p in rules if not p.startswith("/") or p.strip("/") == ""]
    assert "/venv/" in rules


def test_what_each_abi_refuses() -> None:
    fs1, net1, scoped1 = landlock.handled(1)
    assert fs1 & READ_FILE and not net1 and not scoped1
    _fs4, net4, scoped4 = landlock.handled(4)
    assert net4 and not scoped4
    fs6, _net6, scoped6 = landlock.handled(6)
    assert scoped6 and fs6 & landlock.TRUNCATE
