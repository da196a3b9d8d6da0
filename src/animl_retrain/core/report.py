"""The stage report: counts, skipped items with the reason, and how long the stage took."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log

REPORT_NAME = "report.json"


class Report:
    """What a stage did: counts, skipped items with the reason, and how long it took.

    Written as ``report.json`` in the stage's output folder and shown in the run summary.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.counts: dict[str, Any] = {}
        self.problems: list[dict[str, str]] = []
        self.details: dict[str, Any] = {}
        self._start = time.perf_counter()
        self.seconds = 0.0

    def problem(self, what: str, where: str, detail: str = "") -> None:
        """Record one skipped item and log it."""
        self.problems.append({"what": what, "where": where, "detail": detail})
        log.warning("%s: %s: %s %s", self.stage, what, where, detail)

    def problem_counts(self) -> dict[str, int]:
        """Count problems by kind."""
        out: dict[str, int] = {}
        for p in self.problems:
            out[p["what"]] = out.get(p["what"], 0) + 1
        return out

    def finish(self, out_dir: Path | None = None) -> dict[str, Any]:
        """Stop the clock, optionally write ``report.json`` into ``out_dir``, and return the report."""
        self.seconds = round(time.perf_counter() - self._start, 3)
        data = {
            "stage": self.stage,
            "seconds": self.seconds,
            "counts": self.counts,
            "problem_counts": self.problem_counts(),
            "problems": self.problems,
            **self.details,
        }
        if out_dir is not None:
            write_json(Path(out_dir) / REPORT_NAME, data)
        return data
