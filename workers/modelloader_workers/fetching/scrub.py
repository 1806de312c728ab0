"""Error text from storage libraries, made fit for a LoadedModel's status: one line, short, and
without any credential value in it."""

from __future__ import annotations

from collections.abc import Mapping

MIN_SECRET = 4  # shorter values are no secret and would mangle the text
# Keys whose values say where, not who: kept, they make a message useful.
PUBLIC_KEYS = frozenset(
    {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "GCS_ENDPOINT_URL"}
)


def scrub(text: str, credentials: Mapping[str, str]) -> str:
    for key, value in credentials.items():
        value = value.strip()
        if key in PUBLIC_KEYS:
            continue
        if len(value) >= MIN_SECRET and value in text:
            text = text.replace(value, "***")
    return text


def first_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line[:limit]
