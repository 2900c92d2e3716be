"""The run report: ``<workdir>/report.json`` (keys from ARCHITECTURE.md) and a readable ``report.md``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

STAGE_FIELDS = ("status", "seconds", "cached", "rows_in", "rows_out", "failures")


def _accuracy_block(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    return {k: evaluation[k] for k in ("avg_acc", "worst_group_acc", "worst_group", "per_group", "n")}


def build_report(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Report dict from the stage summaries (stages that did not run are absent)."""
    quarantine = [q for s in summaries.values() for q in s.get("quarantine", [])]
    holdout = summaries.get("holdout", {})
    before = holdout.get("before", {})
    counts = {
        "train": holdout.get("train"),
        "holdout": holdout.get("holdout"),
        "captions": summaries.get("caption", {}).get("rows_out"),
        "extracted": (summaries["extract"]["rows_out"] - summaries["extract"]["failures"]
                      if "extract" in summaries else None),
        "quarantined": len(quarantine),
    }
    return {
        "stages": {name: {k: s.get(k) for k in STAGE_FIELDS} for name, s in summaries.items()},
        "counts": counts,
        "before": _accuracy_block(before.get("test")),
        "before_val": _accuracy_block(before.get("val")),
        "quarantine": quarantine,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable report: stage table, counts, accuracy before augmentation, quarantine."""
    lines = ["# ASPIRE run report", "", "## Stages", "", "| stage | status | cached | seconds | rows in | rows out | failures |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['cached']} | {s['seconds']} | {s['rows_in']} | {s['rows_out']} | {s['failures']} |")
    lines += ["", "## Counts", ""] + [f"- {k}: {v}" for k, v in report["counts"].items()]
    before = report.get("before")
    if before:
        lines += ["", "## Accuracy before augmentation (test split)", "",
                  f"average {_pct(before['avg_acc'])}, worst group {_pct(before['worst_group_acc'])} (group {before['worst_group']})",
                  "", "| group | accuracy |", "|---|---|"]
        lines += [f"| {g} | {_pct(a)} |" for g, a in before["per_group"].items()]
    if report["quarantine"]:
        lines += ["", "## Quarantine", "", "| path | reason |", "|---|---|"]
        lines += [f"| {q['path']} | {q['reason']} |" for q in report["quarantine"]]
    return "\n".join(lines) + "\n"


def write_report(workdir: Path, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write report.json, report.md and quarantine.csv into ``workdir``; return the report."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = build_report(summaries)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    (workdir / "report.md").write_text(render_markdown(report))
    with open(workdir / "quarantine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "path", "reason"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["quarantine"])
    return report
