"""The recording and alerting rules in dashboards/ pass promtool's check and its rule tests
(each alert fires on the series meant to raise it, and only there)."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO
from tests.support.prometheus_tools import prometheus_tool

RULES = REPO / "dashboards" / "rules.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus_tool("promtool")), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULES.parent,
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_where_they_should() -> None:
    result = promtool("test", "rules", "rules_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
