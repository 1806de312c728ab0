"""A Secret's values as Kubernetes merges them: `data` (base64) decoded, then `stringData` on
top. One reading for both modes: the operator's Secrets from the API server and
`modelloader local`'s from manifest files. Messages name the key, never the value."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any


class SecretNotText(ValueError):
    """A Secret key whose value is not base64 of UTF-8 text (credentials are read as text)."""


def secret_values(doc: Mapping[str, Any], namespace: str, name: str) -> dict[str, str]:
    """The values of Secret `namespace/name` (its identity names it in messages)."""
    where = f"Secret {namespace}/{name}"
    data, string_data = doc.get("data") or {}, doc.get("stringData") or {}
    if not isinstance(data, Mapping) or not isinstance(string_data, Mapping):
        raise SecretNotText(f"{where}: data and stringData must map keys to text")
    values: dict[str, str] = {}
    for key, value in data.items():
        try:
            values[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise SecretNotText(f"{where}: key {str(key)!r} is not base64 text") from None
    return values | {str(k): str(v) for k, v in string_data.items()}
