"""Reading /metrics the way Prometheus does: parsed, not matched as text.

Every series carries `instance_id`; `without_instance_id` drops it, so a test that is about
another label can keep asserting on one exposition line.
"""

from __future__ import annotations

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import INSTANCE_LABEL

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
_INSTANCE = re.compile(INSTANCE_LABEL + r'="[^"]*",?')


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Every sample by (name, labels), and every family's help text by name."""
    series: Series = {}
    helps: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        helps[family.name] = family.documentation
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series, helps


def scrape(base_url: str) -> tuple[Series, dict[str, str]]:
    """GET {base_url}/metrics and parse it."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:  # noqa: S310 - loopback URL built here
        return parse(response.read().decode())


def value(series: Series, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`; None when there is none."""
    wanted = set(labels.items())
    found = [v for (n, have), v in series.items() if n == name and wanted <= have]
    if len(found) > 1:
        raise AssertionError(f"{len(found)} samples of {name} match {labels}")
    return found[0] if found else None


def without_instance_id(text: str) -> str:
    """The exposition text with the constant `instance_id` label removed from every line."""
    return _INSTANCE.sub("", text).replace("{}", "")
