"""Reading manifests from files: several documents, folders, duplicates, half-saved files."""

from __future__ import annotations

from pathlib import Path

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
