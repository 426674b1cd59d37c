"""How `facecast bench` commands print their summaries."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and how many; empty for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 1), "p95": round(p95, 1), "n": len(ordered)}


def print_summary(summary: Mapping[str, object], as_json: bool, *, sections: bool = False) -> None:
    """One JSON object, or a ``key: value`` line each (``sections``: each value a titled group of lines)."""
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    groups = summary.items() if sections else [(None, summary)]
    for title, lines in groups:
        if title is not None:
            print(f"== {title} ==")
        for key, value in lines.items():  # type: ignore[union-attr]
            print(f"{key}: {value}")
