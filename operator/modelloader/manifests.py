"""Manifests from files: YAML files (several documents each) or folders of them.

The source of truth of `modelloader local`: the Kubernetes operator reads the same resources from
the API server instead. A file that stops parsing (half-saved in an editor) keeps its last good
documents: a typo must not unload models that are serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelloader import policy as policy_kind
from modelloader.policy import OriginPolicy, parse_origin_policy
from modelloader.resource import KIND, LoadedModel, ManifestError, parse_loaded_model
from modelloader.secret_data import SecretNotText, secret_values
from modelloader.tenancy import TokenSecret, is_token_secret, parse_token_secret

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Rejected:
    """A LoadedModel manifest that failed validation; shown in status like a Failed model."""

    namespace: str
    name: str
    where: str  # "file.yaml#2"
    message: str


@dataclass(frozen=True)
class ManifestSet:
    models: tuple[LoadedModel, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    file_errors: tuple[str, ...] = ()  # and OriginPolicies or token Secrets that are wrong
    policies: tuple[OriginPolicy, ...] = ()
    secrets: tuple[TokenSecret, ...] = ()
    # Every Secret's data by (namespace, name): credentials for spec.source.credentialsSecret.
    secret_data: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)


def manifest_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
    return files


# libyaml where PyYAML was built with it (its wheels are): several times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

StatKey = tuple[int, int, int, int]


def _stat_key(path: Path) -> StatKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class ManifestReader:
    """Reads the given paths on each call, remembering each file's last good documents. Files
    are parsed again only when they change (by inode, size and times): the loop asks every
    half second, and parsing YAML holds the interpreter's lock, which the gateway in the same
    process needs (the figure: bench/RESULTS.md, "What changed, and what each change bought")."""

    paths: Sequence[Path]
    default_namespace: str = "default"
    # Each file's last good documents, with the stat they were read at (None: the file
    # broke since, so it is read again next time).
    _parsed: dict[Path, tuple[StatKey | None, list[Any]]] = field(default_factory=dict)
    _last: tuple[Any, ManifestSet] | None = None

    def read(self) -> ManifestSet:
        files = manifest_files(self.paths)
        missing = [p for p in self.paths if not p.exists()]
        stats = [_stat_key(path) for path in files]
        key = (tuple(files), tuple(stats), tuple(missing))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        documents: list[tuple[Path, int, Any]] = []
        file_errors = [f"{p}: no such file or folder" for p in missing]
        for path, stat in zip(files, stats, strict=True):
            known, docs = self._parsed.get(path, (None, []))
            if stat is None or known != stat:
                try:
                    text = path.read_text()
                    docs = [d for d in yaml.load_all(text, Loader=_YAML_LOADER) if d is not None]
                    self._parsed[path] = (stat, docs)
                except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
                    file_errors.append(
                        f"{path}: {_first_line(error)}; keeping its last good version"
                    )
                    self._parsed[path] = (None, docs)
            documents += [(path, i, d) for i, d in enumerate(docs)]
        for gone in set(self._parsed) - set(files):
            del self._parsed[gone]
        models, rejected = parse_documents(documents, self.default_namespace)
        policies, secrets, problems = parse_tenancy(documents, self.default_namespace)
        secret_data, secret_problems = parse_secret_data(documents, self.default_namespace)
        found = ManifestSet(
            tuple(models),
            tuple(rejected),
            tuple(file_errors + problems + secret_problems),
            tuple(policies),
            tuple(secrets),
            secret_data,
        )
        if not file_errors:  # a broken file is read again: its error may be fixed in place
            self._last = (key, found)
        return found


def parse_tenancy(
    documents: Iterable[tuple[Path, int, Any]], default_namespace: str = "default"
) -> tuple[list[OriginPolicy], list[TokenSecret], list[str]]:
    """OriginPolicies and token Secrets among the documents, and what is wrong with others.
    Of two policies for one origin, the first counts."""
    policies: dict[str, OriginPolicy] = {}
    secrets: list[TokenSecret] = []
    problems: list[str] = []
    for path, index, doc in documents:
        where = f"{path}#{index + 1}"
        if isinstance(doc, Mapping) and doc.get("kind") == policy_kind.KIND:
            try:
                found = parse_origin_policy(doc)
            except ManifestError as error:
                problems.append(f"{where}: OriginPolicy: {error}")
                continue
            if found.origin in policies:
                problems.append(f"{where}: OriginPolicy {found.origin} is defined twice")
                continue
            policies[found.origin] = found
        elif is_token_secret(doc):
            secret = parse_token_secret(doc, default_namespace)
            if isinstance(secret, TokenSecret):
                secrets.append(secret)
            else:
                problems.append(f"{where}: Secret {secret.name}: {secret.message}")
    return list(policies.values()), secrets, problems


def parse_secret_data(
    documents: Iterable[tuple[Path, int, Any]], default_namespace: str = "default"
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """Each Secret's `data` (base64, decoded) and `stringData`, as Kubernetes merges them."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    problems: list[str] = []
    for path, index, doc in documents:
        if not isinstance(doc, Mapping) or doc.get("kind") != "Secret":
            continue
        namespace, name = _identity(doc, default_namespace)
        try:
            data = secret_values(doc, namespace, name)
        except SecretNotText as error:
            problems.append(f"{path}#{index + 1}: {error}")
            continue
        found[(namespace, name)] = data
    return found, problems


def parse_documents(
    documents: Iterable[tuple[Path, int, Any]], default_namespace: str = "default"
) -> tuple[list[LoadedModel], list[Rejected]]:
    """LoadedModels in document order (the order models are created in); others are skipped."""
    models: list[LoadedModel] = []
    rejected: list[Rejected] = []
    seen: dict[tuple[str, str], str] = {}
    for path, index, doc in documents:
        where = f"{path}#{index + 1}"
        if not _is_loaded_model(doc):
            continue
        namespace, name = _identity(doc, default_namespace)
        try:
            if (namespace, name) in seen:
                raise ManifestError(
                    f"metadata.name: LoadedModel {namespace}/{name} is already defined at "
                    f"{seen[(namespace, name)]}"
                )
            model = parse_loaded_model(
                doc, default_namespace=default_namespace, base_dir=path.parent.resolve()
            )
        except ManifestError as error:
            rejected.append(Rejected(namespace, name, where, str(error)))
            continue
        seen[(namespace, name)] = where
        models.append(model)
    return models, rejected


def _is_loaded_model(doc: Any) -> bool:
    # Other kinds (Secrets, OriginPolicies, ...) may share the files; a wrong apiVersion on a
    # LoadedModel is the parser's to report.
    return isinstance(doc, Mapping) and doc.get("kind") == KIND


def _identity(doc: Mapping[str, Any], default_namespace: str) -> tuple[str, str]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return str(meta.get("namespace", default_namespace)), str(meta.get("name", "?"))


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
