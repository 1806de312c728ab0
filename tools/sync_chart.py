"""Copy the repository's CRDs, dashboards and Prometheus rules into the Helm chart.

The repository's `crds/` and `dashboards/` are the one source of truth; the chart carries copies
because `helm package` takes only files inside the chart. `tests/unit/test_chart.py` fails
when a copy differs, and says to run this.

    python tools/sync_chart.py          # copy
    python tools/sync_chart.py --check  # exit 1 and name the files that differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "modelloader"


def is_rules_file(path: Path) -> bool:
    """A Prometheus rules file: a YAML document with top-level `groups:`."""
    return any(line.startswith("groups:") for line in path.read_text().splitlines())


def wanted() -> dict[Path, Path]:
    """Chart copy -> its source in the repository."""
    copies: dict[Path, Path] = {}
    for source in sorted((REPO / "crds").glob("*.yaml")):
        copies[CHART / "crds" / source.name] = source
    dashboards = REPO / "dashboards"
    for source in sorted(dashboards.glob("*.json")):
        copies[CHART / "files" / "dashboards" / source.name] = source
    for source in sorted([*dashboards.glob("*.yaml"), *dashboards.glob("*.yml")]):
        if is_rules_file(source):
            copies[CHART / "files" / "prometheus" / f"{source.stem}.yaml"] = source
    return copies


def managed_folders() -> list[Path]:
    return [CHART / "crds", CHART / "files" / "dashboards", CHART / "files" / "prometheus"]


def differences() -> list[str]:
    """What a sync would change, as readable lines; empty when the chart is in step."""
    copies = wanted()
    problems = [
        f"{copy.relative_to(REPO)} differs from {source.relative_to(REPO)}"
        for copy, source in copies.items()
        if not copy.exists() or copy.read_bytes() != source.read_bytes()
    ]
    for folder in managed_folders():
        for stale in sorted(folder.glob("*")) if folder.exists() else []:
            if stale.is_file() and stale not in copies:
                problems.append(f"{stale.relative_to(REPO)} has no source any more")
    return problems


def sync() -> None:
    copies = wanted()
    for folder in managed_folders():
        for stale in folder.glob("*") if folder.exists() else []:
            if stale.is_file() and stale not in copies:
                stale.unlink()
    for copy, source in copies.items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(source.read_bytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    args = parser.parse_args()
    if args.check:
        problems = differences()
        for line in problems:
            print(line)
        return 1 if problems else 0
    sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
