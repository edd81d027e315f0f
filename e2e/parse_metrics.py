#!/usr/bin/env python3
"""Parses OpenMetrics text on stdin with the Prometheus project's parser (PyPI prometheus-client) and
prints every sample as a JSON line: {"family", "type", "name", "labels", "value"}. A document the
parser rejects (syntax, missing "# EOF", a counter without _total, ...) exits non-zero."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": s.name,
                          "labels": s.labels, "value": s.value}))
