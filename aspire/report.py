"""The run report: ``<workdir>/report.json`` (keys from ARCHITECTURE.md) and a readable ``report.md`` with an
image grid of originals beside their prediction-flipping edits."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from aspire.manifest import Row

STAGE_FIELDS = ("status", "seconds", "cached", "rows_in", "rows_out", "failures")
GRID_FILE = "edits.png"
CHART_FILE = "accuracy.png"


def _accuracy_block(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    return {k: evaluation[k] for k in ("avg_acc", "worst_group_acc", "worst_group", "per_group", "n")}


def build_report(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Report dict from the stage summaries (stages that did not run are absent or None)."""
    quarantine = [q for s in summaries.values() for q in s.get("quarantine", [])]
    holdout = summaries.get("holdout", {})
    before = holdout.get("before", {})
    edits = [summaries[s] for s in ("remove", "background") if s in summaries]
    collapse = summaries.get("collapse", {})
    counts = {
        "train": holdout.get("train"),
        "holdout": holdout.get("holdout"),
        "captions": summaries.get("caption", {}).get("rows_out"),
        "extracted": (summaries["extract"]["rows_out"] - summaries["extract"]["failures"]
                      if "extract" in summaries else None),
        "edits_tried": sum(e.get("edits_tried", 0) for e in edits) if edits else None,
        "edits_kept": sum(e.get("edits_kept", 0) for e in edits) if edits else None,
        "generated": summaries.get("generate", {}).get("generated"),
        "quarantined": len(quarantine),
    }
    after = summaries.get("retrain", {}).get("after", {})
    return {
        "worse_groups": worse_groups(before.get("test"), after.get("test")),
        "no_spurious_found": collapse.get("no_spurious_found"),
        "spurious_rule": collapse.get("rule"),
        "stages": {name: {k: s.get(k) for k in STAGE_FIELDS} for name, s in summaries.items()},
        "counts": counts,
        "spurious": collapse.get("spurious"),
        "top_k": collapse.get("top_k"),
        "planted_found": collapse.get("planted"),
        "flipped": collapse.get("flipped"),
        "skip_reasons": {s: summaries[s].get("skip_reasons") for s in ("remove", "background") if s in summaries},
        "before": _accuracy_block(before.get("test")),
        "after": _accuracy_block(after.get("test")),
        "before_val": _accuracy_block(before.get("val")),
        "after_val": _accuracy_block(after.get("val")),
        "quarantine": quarantine,
    }


WORSE_BY = 0.05
"""A test group whose accuracy drops by more than this after augmentation is reported: generation may have
opened a new shortcut."""


def worse_groups(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, list[float]]:
    """Test groups whose accuracy fell by more than :data:`WORSE_BY`: ``{group: [before, after]}``."""
    if not before or not after:
        return {}
    return {g: [a, after["per_group"][g]] for g, a in before["per_group"].items()
            if g in after["per_group"] and after["per_group"][g] < a - WORSE_BY}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(value: Any) -> str:
    """A markdown table cell: group names such as ``2:dog|snow|+sled`` hold ``|``, which would split the cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _spurious_section(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Spurious features found (top-k groups of phrases whose edits flipped the prediction)", ""]
    planted = report.get("planted_found") or {}
    if report.get("spurious_rule"):
        lines += [f"Rule: {report['spurious_rule']}; the others are listed but not claimed.", ""]
    head = "| class | rank | edits flipped / tried | flip rate | captions naming it: class / others | spurious feature | phrases |"
    if planted:
        lines += [head + " planted object found | planted background found |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += [head, "|---|---|---|---|---|---|---|"]
    for name, groups in (report.get("top_k") or {}).items():
        for rank, group in enumerate(groups, 1):
            cells = [name, str(rank), f"{group['count']} / {group.get('tried', '?')}", _pct(group.get("flip_rate")),
                     f"{_pct(group.get('mentioned'))} / {_pct(group.get('mentioned_elsewhere'))}",
                     "yes" if group.get("confident", True) else "no", ", ".join(group["phrases"])]
            if planted:
                found = planted.get(name, {})
                cells += ([str(found.get("object")), str(found.get("background"))] if rank == 1 else ["", ""])
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for name in report.get("no_spurious_found") or []:
        lines.append(f"\n**{name}: no spurious feature found** (no group passes the rule).")
    lines += ["", "Flipped / tried edits per phrase (most flips first):", ""]
    for name, phrases in (report.get("flipped") or {}).items():
        shown = ", ".join(f"{p} {n.get('kept', 0)}/{n.get('tried', 0)}" for p, n in list(phrases.items())[:8])
        lines.append(f"- {name}: {shown}")
    for stage, reasons in (report.get("skip_reasons") or {}).items():
        if reasons:
            lines.append(f"- {stage} skipped: " + ", ".join(f"{r} ({n})" for r, n in list(reasons.items())[:6]))
    return lines


def render_markdown(report: dict[str, Any], grid: str | None = None, chart: str | None = None) -> str:
    """Human-readable report: stage table, counts, accuracy before augmentation, spurious features, quarantine."""
    lines = ["# ASPIRE run report", "", "## Stages", "", "| stage | status | cached | seconds | rows in | rows out | failures |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['cached']} | {s['seconds']} | {s['rows_in']} | {s['rows_out']} | {s['failures']} |")
    lines += ["", "## Counts", ""] + [f"- {k}: {v}" for k, v in report["counts"].items() if v is not None]
    before, after = report.get("before"), report.get("after")
    if before:
        lines += ["", "## Test accuracy before and after augmentation", "", "| | average | worst group |", "|---|---|---|",
                  f"| before (ERM) | {_pct(before['avg_acc'])} | {_pct(before['worst_group_acc'])} ({_cell(before['worst_group'])}) |"]
        if after:
            lines.append(f"| after (retrained on the augmented set) | {_pct(after['avg_acc'])} | "
                         f"{_pct(after['worst_group_acc'])} ({_cell(after['worst_group'])}) |")
        lines += ["", "| group | before | after |", "|---|---|---|"]
        lines += [f"| {_cell(g)} | {_pct(a)} | {_pct((after or {}).get('per_group', {}).get(g))} |" for g, a in before["per_group"].items()]
        worse = report.get("worse_groups") or {}
        lines += ["", f"Groups more than {100 * WORSE_BY:.0f} points worse after augmentation (a new shortcut?): "
                  + (", ".join(f"{g} {_pct(b)} -> {_pct(a)}" for g, (b, a) in worse.items()) or "none")]
        if chart:
            lines += ["", f"![per-group accuracy]({chart})"]
    if report.get("top_k") is not None:
        lines += _spurious_section(report)
    if grid:
        lines += ["", "## Originals beside their prediction-flipping edits, and generated images", "", f"![edits]({grid})"]
    if report.get("robust"):
        lines += [""] + render_robust(report["robust"], level="##")
    if report["quarantine"]:
        lines += ["", "## Quarantine", "", "| path | reason |", "|---|---|"]
        lines += [f"| {_cell(q['path'])} | {_cell(q['reason'])} |" for q in report["quarantine"]]
    return "\n".join(lines) + "\n"


def edit_grid(rows: list[Row], out: Path, per_class: int = 3, tile: int = 96) -> Path | None:
    """A PNG grid, one line per class: (original | kept edit) pairs captioned with the phrase edited, then
    generated images of the class."""
    originals = {r["image_id"]: r for r in rows if "source_image_id" not in r and r.get("source") != "generated"}
    edits: dict[str, list[Row]] = {}
    made: dict[str, list[Row]] = {}
    for row in rows:
        if row.get("kept") and row.get("source_image_id") in originals:
            edits.setdefault(row["class_name"], []).append(row)
        elif row.get("source") == "generated":
            made.setdefault(row["class_name"], []).append(row)
    names = sorted(set(edits) | set(made))
    if not names:
        return None
    label_h = 14
    canvas = Image.new("RGB", (per_class * 3 * tile, len(names) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for line, name in enumerate(names):
        top = line * (tile + label_h)
        pairs = []
        for e in edits.get(name, [])[:per_class]:
            pairs += [(originals[e["source_image_id"]]["path"], f"{name}: original"),
                      (e["path"], f"{'bg' if e.get('alt') else 'rm'} {e['phrase']}")]
        pairs += [(g["path"], f"generated #{g['seed']}") for g in made.get(name, [])[:per_class]]
        for k, (path, text) in enumerate(pairs[: per_class * 3]):
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB").resize((tile, tile)), (k * tile, top))
            draw.text((k * tile + 2, top + tile), text[:16], fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def accuracy_chart(report: dict[str, Any], out: Path) -> Path | None:
    """A PNG bar chart of per-group test accuracy before and after augmentation."""
    before, after = report.get("before"), report.get("after")
    if not before:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(before["per_group"])
    x = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(groups)), 3.6))
    ax.bar([i - 0.2 for i in x], [before["per_group"][g] for g in groups], width=0.4, label="before (ERM)")
    if after:
        ax.bar([i + 0.2 for i in x], [after["per_group"].get(g, 0) for g in groups], width=0.4, label="after (augmented)")
    ax.set_xticks(list(x), groups, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(workdir: Path, summaries: dict[str, dict[str, Any]], edit_rows: list[Row] | None = None) -> dict[str, Any]:
    """Write report.json, report.md (with the edit grid when ``edit_rows`` are given) and quarantine.csv."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = build_report(summaries)
    grid = edit_grid(edit_rows, workdir / GRID_FILE) if edit_rows else None
    chart = accuracy_chart(report, workdir / CHART_FILE)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    (workdir / "report.md").write_text(render_markdown(report, GRID_FILE if grid else None, CHART_FILE if chart else None))
    with open(workdir / "quarantine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "path", "reason"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["quarantine"])
    return report


METHOD_NAMES = {"erm": "ERM", "jtt": "JTT", "dfr": "DFR", "groupdro": "Group DRO", "clarify": "CLARIFY", "slim": "SLIM"}


def _mean_std(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def render_robust(robust: dict[str, Any], level: str = "#") -> list[str]:
    """Markdown of ``aspire train``'s results, laid out like ASPIRE's Table 1: per method, worst-group and average
    test accuracy without and with the augmentations (gain in brackets), then per-group accuracy.

    Args:
        robust: ``{"lines": [...], "grouping": {data: {...}}}`` as written to ``robust.json``.
        level: markdown heading level of the section.
    """
    lines = robust["lines"]
    seeds = sorted({l["seeds"] for l in lines})
    out = [f"{level} Robust trainers with and without the augmentations",
           "", f"Test split, mean ± std (population) over {'/'.join(map(str, seeds))} seeds, in %. "
           "Groups for training and selection: " + ", ".join(f"{d}: {g['groups']}" for d, g in robust["grouping"].items())
           + ".", "", "| method | worst-group acc. | avg. acc. |", "|---|---|---|"]
    by_key = {(l["method"], l["data"]): l for l in lines}
    for method in dict.fromkeys(l["method"] for l in lines):
        base, aug = by_key.get((method, "original")), by_key.get((method, "augmented"))
        name = METHOD_NAMES.get(method, method)
        if base:
            out.append(f"| {name} | {_mean_std(base['worst_group_acc'], base['worst_std'])} | "
                       f"{_mean_std(base['avg_acc'], base['avg_std'])} |")
        if aug:
            worst_gain = f" ({100 * (aug['worst_group_acc'] - base['worst_group_acc']):+.1f})" if base else ""
            avg_gain = f" ({100 * (aug['avg_acc'] - base['avg_acc']):+.1f})" if base else ""
            out.append(f"| {name} + ASPIRE | {_mean_std(aug['worst_group_acc'], aug['worst_std'])}{worst_gain} | "
                       f"{_mean_std(aug['avg_acc'], aug['avg_std'])}{avg_gain} |")
    for l in lines:  # the human-in-the-loop methods: what the person gave and how the model was selected
        if l.get("budget") or l.get("selection"):
            budget = ", ".join(f"{v} {k}" for k, v in (l.get("budget") or {}).items())
            out.append(f"\n{METHOD_NAMES.get(l['method'], l['method'])} ({l['data']}): annotation budget {budget or 'n/a'}; "
                       f"model selection: {l.get('selection', 'n/a')}.")
    groups = list(dict.fromkeys(g for l in lines for g in l.get("per_group", {})))
    if groups:
        header = " | ".join(_cell(g) for g in groups)
        out += ["", f"{level}# Per-group test accuracy (%, mean over seeds)", "",
                "| method | data | " + header + " |", "|---|---|" + "---|" * len(groups)]
        out += [f"| {METHOD_NAMES.get(l['method'], l['method'])} | {l['data']} | "
                + " | ".join(f"{100 * l['per_group'][g]:.1f}" if g in l["per_group"] else "" for g in groups) + " |"
                for l in lines]
    return out


def attach_robust(workdir: Path, robust: dict[str, Any]) -> None:
    """Add ``aspire train``'s results to the run's report.json and report.md (when ``aspire run`` wrote them)."""
    path = Path(workdir) / "report.json"
    if not path.is_file():
        return
    report = {**json.loads(path.read_text()), "robust": robust}
    path.write_text(json.dumps(report, indent=1))
    grid = GRID_FILE if (Path(workdir) / GRID_FILE).is_file() else None
    chart = CHART_FILE if (Path(workdir) / CHART_FILE).is_file() else None
    (Path(workdir) / "report.md").write_text(render_markdown(report, grid, chart))
