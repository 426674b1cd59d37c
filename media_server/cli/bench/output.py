"""How `facecast bench` commands print their summaries."""

from __future__ import annotations

import json
from collections.abc import Mapping


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
