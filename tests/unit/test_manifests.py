"""Reading manifests from files: several documents, folders, duplicates, half-saved files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from modelloader.manifests import ManifestReader

DOC = """apiVersion: modelloader.dev/v1alpha1
kind: LoadedModel
metadata: {{name: {name}}}
spec: {{source: {{uri: "file://m.tflite"}}{extra}}}
"""


def doc(name: str, extra: str = "") -> str:
    return DOC.format(name=name, extra=extra)


def test_multi_document_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(doc("one") + "---\n" + doc("two"))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.yml").write_text(doc("three") + "---\nkind: Secret\napiVersion: v1\n")
    (sub / "notes.txt").write_text("not yaml")
    result = ManifestReader([tmp_path]).read()
    assert [m.name for m in result.models] == ["one", "two", "three"]
    assert result.models[2].base_dir == sub.resolve()
    assert result.rejected == () and result.file_errors == ()


def test_invalid_and_duplicate_documents_are_rejected_with_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        doc("ok") + "---\n" + doc("bad", ", accelerator: tpu") + "---\n" + doc("ok")
    )
    result = ManifestReader([tmp_path / "a.yaml"]).read()
    assert [m.name for m in result.models] == ["ok"]
    messages = {r.name: r.message for r in result.rejected}
    assert messages["bad"].startswith("spec.accelerator:")
    assert "already defined at" in messages["ok"] and "a.yaml#1" in messages["ok"]


def test_a_file_that_stops_parsing_keeps_its_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(doc("one"))
    reader = ManifestReader([tmp_path])
    assert [m.name for m in reader.read().models] == ["one"]
    path.write_text(doc("one") + "  : : [unclosed\n")
    result = reader.read()
    assert [m.name for m in result.models] == ["one"]
    assert "keeping its last good version" in result.file_errors[0]
    path.unlink()
    assert reader.read().models == ()


MODEL_A = """\
apiVersion: modelloader.dev/v1alpha1
kind: LoadedModel
metadata: {name: a}
spec: {source: {uri: "file://a.tflite"}}
"""


def test_unchanged_files_are_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from modelloader import manifests

    (tmp_path / "a.yaml").write_text(MODEL_A)
    reader = manifests.ManifestReader([tmp_path])
    parsed: list[str] = []
    real = yaml.load_all

    def counting(text: str, **options: Any) -> Any:
        parsed.append(text)
        return real(text, **options)

    monkeypatch.setattr(manifests.yaml, "load_all", counting)
    first = reader.read()
    assert [m.name for m in first.models] == ["a"]
    assert reader.read() is first and len(parsed) == 1
    (tmp_path / "b.yaml").write_text("kind: Something\n")
    assert reader.read().models == first.models and len(parsed) == 2  # only the new file
    (tmp_path / "a.yaml").write_text(MODEL_A.replace("name: a}", "name: a2}"))
    assert [m.name for m in reader.read().models] == ["a2"] and len(parsed) == 3
