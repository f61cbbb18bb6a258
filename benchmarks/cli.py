"""Command-line pieces the benchmarks share."""

from __future__ import annotations

import json


def run_config_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value as JSON (numbers, true/false), else as a string, so
    that ``--set layercam-ae-map-size=probe`` needs no quotes."""
    key, _, value = text.partition("=")
    try:
        parsed: object = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed
