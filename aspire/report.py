"""The run report: ``<workdir>/report.json`` (keys from ARCHITECTURE.md) and a readable ``report.md`` with an
image grid of originals beside their prediction-flipping edits."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from aspire.cache import file_lock, write_text_atomic
from aspire.manifest import Row
from aspire.metrics import chance_of_losing

STAGE_FIELDS = ("status", "seconds", "cached", "rows_in", "rows_out", "failures")
GRID_FILE = "edits.png"
CHART_FILE = "accuracy.png"  # with accuracy.svg and accuracy.pdf beside it
TOP_K_FILE = "top_k.png"  # with top_k.svg and top_k.pdf
FIGURES = {"grid": GRID_FILE, "chart": CHART_FILE, "top_k": TOP_K_FILE}


def _accuracy_block(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    block = {k: evaluation[k] for k in ("avg_acc", "worst_group_acc", "worst_group", "per_group", "n")}
    return {**block, "group_sizes": evaluation.get("group_sizes")}  # optional: a summary without it still renders


def build_report(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Report dict from the stage summaries (stages that did not run are absent or None)."""
    quarantine = [{**q, "stage": name} for name, s in summaries.items() for q in s.get("quarantine", [])]
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
    choice = summaries.get("retrain", {}).get("per_class")
    if choice:  # several multiples generated: the retrained model saw the chosen one's images
        counts["generated_used"] = next(c["generated"] for c in choice["choices"] if c["per_class"] == choice["chosen"])
    after = summaries.get("retrain", {}).get("after", {})
    return {
        "worse_groups": worse_groups(before.get("test"), after.get("test"), summaries.get("retrain", {}).get("test_changes"),
                                     summaries.get("retrain", {}).get("test_lost")),
        "per_class": summaries.get("retrain", {}).get("per_class"),
        "kept_model_before": summaries.get("retrain", {}).get("kept_model_before"),
        "no_spurious_found": collapse.get("no_spurious_found"),
        "spurious_rule": collapse.get("rule"),
        "stages": {name: {k: s.get(k) for k in STAGE_FIELDS} for name, s in summaries.items()},
        "counts": counts,
        "spurious": collapse.get("spurious"),
        "top_k": collapse.get("top_k"),
        "planted_found": collapse.get("planted"),
        "cues": summaries.get("retrain", {}).get("cues"),
        "generation": generation(summaries.get("personalize"), summaries.get("generate")),
        "flipped": collapse.get("flipped"),
        "skip_reasons": {s: summaries[s].get("skip_reasons") for s in ("remove", "background") if s in summaries},
        "before": _accuracy_block(before.get("test")),
        "after": _accuracy_block(after.get("test")),
        "before_val": _accuracy_block(before.get("val")),
        "after_val": _accuracy_block(after.get("val")),
        "quarantine": quarantine,
    }


def generation(personalize: dict[str, Any] | None, generate: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per class: ``planned`` images (the largest ``generate.per_class`` multiple), ``learned_from`` (the number of
    images its generator learned from: textual inversion's training images, else the composite generator's
    exemplars; None when unknown) and ``skipped`` (why no image was generated, or None)."""
    if not generate or not generate.get("planned"):
        return {}
    learned = {c: len(v.get("images") or []) for c, v in ((personalize or {}).get("learned_from") or {}).items()}
    learned |= generate.get("exemplars") or {}
    skipped = generate.get("skipped") or {}
    return {c: {"planned": n, "learned_from": learned.get(c), "skipped": skipped.get(c)}
            for c, n in sorted(generate["planned"].items())}


def generation_section(classes: dict[str, dict[str, Any]]) -> list[str]:
    """The generation table: per class, images planned, images learned from and images per image learned from."""
    lines = ["", "## Generation", "",
             "Each class's generator learns from its kept edits (textual inversion's training images; the composite "
             "generator imitates at most 64). A class learned from a handful of them gets images much alike, which "
             "can teach the retrained model a narrower class than the data shows, and lose test images of it to a "
             "class learned from many (ASPIRE's limitations: limited samples for fine-tuning). Compare the classes' "
             "last column.", "",
             "| class | images planned | images learned from | planned per image learned from |", "|---|---|---|---|"]
    for name, c in classes.items():
        learned = c["learned_from"]
        planned, per = c["planned"], f"{c['planned'] / learned:.0f}" if learned else "-"
        if c["skipped"]:
            planned, per = f"0 ({c['skipped']})", "-"
        lines.append(f"| {_cell(name)} | {_cell(planned)} | {'?' if learned is None else learned} | {per} |")
    return lines


WORSE_BY = 0.05
"""A test group whose accuracy drops by more than this after augmentation is reported: generation may have
opened a new shortcut."""

FROM_CONTEXT = 0.5
"""A worse group's accuracy before came from its context when the model before gave its class to at least this
share of the other classes' test images with the same context (:func:`aspire.metrics.lost_images`). Its lost
images went to a shortcut when the model after gives the class they went to at least this share of the images
with that context of neither class: a new shortcut when the model before did not, a kept one when it did."""

MIN_CONTEXT_IMAGES = 5
"""Neither verdict is drawn from fewer images of the context than this (one image would decide it)."""


def worse_groups(before: dict[str, Any] | None, after: dict[str, Any] | None,
                 changes: dict[str, list[int]] | None = None,
                 lost: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Test groups whose accuracy fell by more than :data:`WORSE_BY`: ``{group: {before, after, images, lost,
    gained, p}}``. ``images``: the group's test images (in a group of 20 one image is 5 points, and a second seed
    moves one or two). With ``changes`` (:func:`aspire.metrics.paired_changes`): the images the augmented model
    lost and gained, and ``p``, McNemar's one-sided exact chance of losing that many by luck; None without.
    With ``lost`` (:func:`aspire.metrics.lost_images`): also ``lost_to`` (the classes the lost images went to)
    and, where the rows tell the context, ``context`` and ``from_context`` (see :data:`FROM_CONTEXT`)."""
    if not before or not after:
        return {}
    sizes = before.get("group_sizes") or {}
    worse = {}
    for group, was in before["per_group"].items():
        now = after["per_group"].get(group)
        if now is None or now >= was - WORSE_BY:
            continue
        n_lost, gained = (changes or {}).get(group, (None, None))
        worse[group] = {"before": was, "after": now, "images": sizes.get(group), "lost": n_lost, "gained": gained,
                        "p": None if n_lost is None else chance_of_losing(n_lost, gained)}
        worse[group] |= where_lost((lost or {}).get(group))
    return worse


def where_lost(detail: dict | None) -> dict[str, Any]:
    """A worse group's ``lost_to``, ``context``, ``from_context``, ``drawn_to`` and ``shortcut`` ("new", "kept"
    or None; see :data:`FROM_CONTEXT`) from its :func:`aspire.metrics.lost_images` entry (nothing without one)."""
    if not detail:
        return {}
    context = detail.get("context")
    found = {"lost_to": detail["lost_to"], "context": context,
             "from_context": context is not None and context["images"] >= MIN_CONTEXT_IMAGES
             and context["before"] >= FROM_CONTEXT}
    if "drawn_to" not in detail:  # a summary committed before the shortcut test: not tested, not "no shortcut"
        return found
    drawn, shortcut = detail["drawn_to"], None
    if drawn is not None and drawn["images"] >= MIN_CONTEXT_IMAGES and drawn["after"] >= FROM_CONTEXT:
        shortcut = "kept" if drawn["before"] >= FROM_CONTEXT else "new"
    return found | {"drawn_to": drawn, "shortcut": shortcut}


def worse_text(worse: dict[str, dict[str, Any]]) -> str:
    """``group before -> after (n images: l lost, g gained, p = ...; lost to ...; context ...)`` per worse group,
    comma-separated ("none")."""
    parts = []
    for group, w in worse.items():
        details = [f"{w['images']} images" if w.get("images") else ""]
        if w.get("p") is not None:
            details[0] += (": " if details[0] else "") + f"{w['lost']} lost, {w['gained']} gained, p = {w['p']:.2g}"
        if w.get("lost_to"):
            details.append("lost to " + ", ".join(f"{name} {n}" for name, n in w["lost_to"].items()))
        if w.get("context"):
            c = w["context"]
            details.append(f"other classes' images with its context given its class: {_pct(c['before'])} -> "
                           f"{_pct(c['after'])} of {c['images']}"
                           + (": its accuracy before came from the context" if w.get("from_context") else ""))
        if w.get("drawn_to"):
            d = w["drawn_to"]
            details.append(f"images with its context that are neither {d.get('of', 'its class')} nor {d['class']} given "
                           f"{d['class']}: {_pct(d['before'])} -> {_pct(d['after'])} of {d['images']}"
                           + {"new": f": the model after follows the context to {d['class']}, the model before "
                                     "did not (a new shortcut)",
                              "kept": f": both models follow the context to {d['class']} (a kept shortcut)"
                              }.get(w.get("shortcut"), ""))
        detail = "; ".join(d for d in details if d)
        parts.append(f"{group} {_pct(w['before'])} -> {_pct(w['after'])}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts) or "none"


def cue_section(cues: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: which cue the models before and after follow on the synthetic benchmark's cue probe."""
    lines = ["", "## Which cue the model follows (synthetic benchmark: cue probe)", "",
             f"Each class's core shape drawn on every background, with no object or with each object "
             f"({cues['before']['images']} images, cues disagreeing in ways the test groups never show). The model "
             "should follow the shape, not another class's planted background or object.", "",
             "| model | follows the shape | follows another class's background | follows another class's object |",
             "|---|---|---|---|"]
    for name, label in (("before", "before (ERM)"), ("after", "after augmentation")):
        if name in cues:
            c = cues[name]
            lines.append(f"| {label} | {_pct(c['shape'])} | {_pct(c['background'])} | {_pct(c['object'])} |")
    return lines


def per_class_text(choice: dict[str, Any]) -> str:
    """One line: which ``generate.per_class`` multiple the retrain stage kept, and each one's validation numbers."""
    return (f"Generated images per class: {choice['chosen']:g}x the class's training images, chosen on validation "
            "worst-group accuracy (then average) from " + ", ".join(
                f"{c['per_class']:g}x ({c['generated']} images: {_pct(c['val_worst_group_acc'])} / "
                f"{_pct(c['val_avg_acc'])})" for c in choice["choices"]) + ".")


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


def render_markdown(report: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """Human-readable report: stage table, counts, accuracy before augmentation, spurious features, quarantine.

    ``images`` maps ``grid``, ``chart`` and ``top_k`` (see :data:`FIGURES`) to a file name or a ``data:`` URI."""
    images = images or {}
    grid, chart = images.get("grid"), images.get("chart")
    lines = ["# ASPIRE run report", "", "## Stages", "", "| stage | status | cached | seconds | rows in | rows out | failures |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['cached']} | {s['seconds']} | {s['rows_in']} | {s['rows_out']} | {s['failures']} |")
    lines += ["", "## Counts", ""] + [f"- {k}: {v}" for k, v in report["counts"].items() if v is not None]
    before, after = report.get("before"), report.get("after")
    if before:
        lines += ["", "## Test accuracy before and after augmentation", "",
                  "| | average | average weighted by the training groups | worst group |", "|---|---|---|---|",
                  f"| before (ERM, last epoch) | {_pct(before['avg_acc'])} | {_pct(before.get('weighted_avg_acc'))} | "
                  f"{_pct(before['worst_group_acc'])} ({_cell(before['worst_group'])}) |"]
        if after:
            lines.append(f"| after (ERM retrained on the augmented set, last epoch) | {_pct(after['avg_acc'])} | "
                         f"{_pct(after.get('weighted_avg_acc'))} | {_pct(after['worst_group_acc'])} ({_cell(after['worst_group'])}) |")
        if report.get("kept_model_before"):
            lines += ["", f"After = before: {report['kept_model_before']}."]
        if report.get("per_class"):
            lines += ["", per_class_text(report["per_class"])]
        lines += ["", "| group | before | after |", "|---|---|---|"]
        lines += [f"| {_cell(g)} | {_pct(a)} | {_pct((after or {}).get('per_group', {}).get(g))} |" for g, a in before["per_group"].items()]
        worse = report.get("worse_groups") or {}
        lines += ["", f"Groups more than {100 * WORSE_BY:.0f} points worse after augmentation (a new shortcut?): "
                  + worse_text(worse)]
        if any(w.get("p") is not None for w in worse.values()):
            lines += ["", "Lost / gained: the group's test images the augmented model gets wrong that the model "
                      "before got right, and the reverse. p: the chance of losing at least that many of them if "
                      "augmentation made the group no worse (McNemar's exact test, one-sided); a drop with p above "
                      "0.05 is within what chance, such as another seed, makes. With many groups, some reach "
                      "p < 0.05 by chance alone (about one in twenty of the groups that did not really change)."]
        if any(w.get("context") or w.get("drawn_to") for w in worse.values()):
            lines += ["", "Context: what the group's images show besides their class (the test rows' `scene` and "
                      "`objects`, `place` or `spurious`); the other classes' images with it are their test images "
                      "and, on a synthetic benchmark, the cue probe's. When "
                      f"the model before gave the group's class to {100 * FROM_CONTEXT:.0f}% or more of the other "
                      "classes' images with that context, it was right on the group because of the context (a "
                      "shortcut): losing some of the group is the cost of no longer following it. When the model "
                      f"after gives a class the lost images went to {100 * FROM_CONTEXT:.0f}% or more of the "
                      "images with that context that are of neither class, it follows a shortcut from the context "
                      "to that class: a new shortcut when the model before did not (one run; another seed may "
                      f"differ). Neither is said from fewer than {MIN_CONTEXT_IMAGES} images of the context; with "
                      "two classes there are no images of neither class, and the second is not tested."]
        if chart:
            lines += ["", f"![per-group accuracy]({chart})"]
    if report.get("cues"):
        lines += cue_section(report["cues"])
    if report.get("top_k") is not None:
        lines += _spurious_section(report)
        if images.get("top_k"):
            lines += ["", f"![top-k groups per class]({images['top_k']})"]
    if report.get("generation"):
        lines += generation_section(report["generation"])
    if grid:
        lines += ["", "## Originals beside their prediction-flipping edits, and generated images", "", f"![edits]({grid})"]
    if report.get("robust"):
        lines += [""] + render_robust(report["robust"], level="##")
    if report["quarantine"]:
        lines += ["", "## Quarantine", "", "| path | reason |", "|---|---|"]
        lines += [f"| {_cell(q['path'])} | {_cell(q['reason'])} |" for q in report["quarantine"]]
    return "\n".join(lines) + "\n"


def edit_grid(rows: list[Row], out: Path, per_class: int = 3, tile: int = 128) -> Path | None:
    """A PNG grid, one line per class: (original | kept edit) pairs, each captioned with what was edited ("boat
    removed", "water -> desert") and the predicted label before and after, then generated images of the class."""
    originals = {r["image_id"]: r for r in rows if "source_image_id" not in r and r.get("source") != "generated"}
    names_by_label = {r["label"]: r["class_name"] for r in rows if "label" in r}
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
    label_h = 26
    canvas = Image.new("RGB", (per_class * 3 * tile, len(names) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for line, name in enumerate(names):
        top = line * (tile + label_h)
        tiles = []
        for e in edits.get(name, [])[:per_class]:
            original = originals[e["source_image_id"]]
            before = names_by_label.get(original.get("pred", original["label"]), "?")
            after = names_by_label.get(e.get("pred"), "?")
            what = f"{e['phrase']} -> {e['alt']}" if e.get("alt") else f"{e['phrase']} removed"
            tiles += [(original["path"], f"{name}: original", f"predicted {before}"),
                      (e["path"], what, f"predicted {after}")]
        tiles += [(g["path"], f"{name}: generated", f"seed {g['seed']}") for g in made.get(name, [])[:per_class]]
        for k, (path, first, second) in enumerate(tiles[: per_class * 3]):
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB").resize((tile, tile)), (k * tile, top))
            characters = tile // 6
            draw.text((k * tile + 2, top + tile + 1), _fit(first, characters), fill="black")
            draw.text((k * tile + 2, top + tile + 13), _fit(second, characters), fill="dimgray")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _fit(text: str, characters: int) -> str:
    return text if len(text) <= characters else text[: characters - 1] + "~"


def _save_figure(fig: Any, out: Path) -> None:
    """PNG (for the report and the UI) with SVG and PDF beside it (for slides and papers)."""
    for suffix in (".png", ".svg", ".pdf"):
        fig.savefig(out.with_suffix(suffix), dpi=130, bbox_inches="tight")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text: editable on a slide, searchable
    return plt


def accuracy_chart(report: dict[str, Any], out: Path) -> Path | None:
    """Per-group test accuracy before and after augmentation (PNG + SVG + PDF): bars that reach 0 or 100% stay
    visible, the worst group of each model is marked, the legend sits above the bars."""
    before, after = report.get("before"), report.get("after")
    if not before:
        return None
    plt = _pyplot()
    groups = list(before["per_group"])
    x = list(range(len(groups)))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups)), 4.2))
    series = [("before (ERM)", before, -0.2, "tab:blue")] + ([("after (augmented)", after, 0.2, "tab:orange")] if after else [])
    width = 0.4 if after else 0.6
    for label, block, shift, colour in series:
        values = [block["per_group"].get(g, 0.0) for g in groups]
        ax.bar([i + (shift if after else 0) for i in x], [max(v, 0.01) for v in values], width=width, label=label,
               color=colour)
        worst = block.get("worst_group")
        if worst in groups:
            i = groups.index(worst)
            ax.annotate(f"worst {label.split()[0]}: {100 * block['worst_group_acc']:.0f}%",
                        (i + (shift if after else 0), max(block["worst_group_acc"], 0.01)), xytext=(0, 14),
                        textcoords="offset points", ha="center", fontsize=7, color=colour,
                        arrowprops={"arrowstyle": "->", "color": colour})
    ax.set_xticks(x, groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.axhline(1.0, color="lightgray", linewidth=0.8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.set_xlim(-0.7, len(groups) - 0.3)
    fig.tight_layout()
    _save_figure(fig, out)
    plt.close(fig)
    return out


def top_k_chart(report: dict[str, Any], out: Path) -> Path | None:
    """Per class, the top-k phrase groups: flip rate of their edits (bar), flipped / tried (label), claimed as
    spurious or not (colour). PNG + SVG + PDF."""
    top_k = {name: groups for name, groups in (report.get("top_k") or {}).items() if groups}
    if not top_k:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(top_k), figsize=(3.4 * len(top_k), 1.8 + 0.45 * max(len(g) for g in top_k.values())),
                             squeeze=False)
    for ax, (name, groups) in zip(axes[0], top_k.items()):
        labels = [_fit(", ".join(g["phrases"]), 28) for g in groups][::-1]
        rates = [g.get("flip_rate") or 0.0 for g in groups][::-1]
        colours = ["tab:red" if g.get("confident", True) else "tab:gray" for g in groups][::-1]
        ax.barh(range(len(groups)), rates, color=colours)
        for i, g in enumerate(groups[::-1]):
            ax.text(rates[i], i, f" {g['count']}/{g.get('tried', '?')}", va="center", fontsize=7)
        ax.set_yticks(range(len(groups)), labels, fontsize=7)
        ax.set_xlim(0, max(0.05, max(rates) * 1.45))
        ax.set_xlabel("edits that flipped the prediction", fontsize=7)
        ax.set_title(name + ("" if name not in (report.get("no_spurious_found") or []) else " (none claimed)"), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Top-k phrase groups per class (red: claimed spurious, gray: below the rule)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, out)
    plt.close(fig)
    return out


def write_report(workdir: Path, summaries: dict[str, dict[str, Any]], edit_rows: list[Row] | None = None) -> dict[str, Any]:
    """Write report.json, report.md (with the edit grid when ``edit_rows`` are given) and quarantine.csv."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = build_report(summaries)
    if edit_rows:
        edit_grid(edit_rows, workdir / GRID_FILE)
    accuracy_chart(report, workdir / CHART_FILE)
    top_k_chart(report, workdir / TOP_K_FILE)
    quarantine = io.StringIO(newline="")
    writer = csv.DictWriter(quarantine, fieldnames=["image_id", "path", "stage", "reason"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["quarantine"])
    # a second run or a reader never sees half a report; under the lock, a temporary file left by a run killed
    # while writing is removed
    with file_lock(workdir / ".report.lock"):
        write_text_atomic(workdir / "report.json", json.dumps(report, indent=1), sweep=True)
        write_text_atomic(workdir / "quarantine.csv", quarantine.getvalue(), sweep=True)
        write_text_atomic(workdir / "report.md", render_markdown(report, figure_files(workdir)), sweep=True)
    return report


GENERATED_IMAGES_GO = {  # ASPIRE App. A.4: two-stage methods get the augmentations in their second stage only
    "erm": "joined to the training set",
    "jtt": "stage 2 only: the error set is identified on the original rows; generated rows join the upweighted "
           "training set and are not upweighted",
    "dfr": "stage 2 only: the base ERM model is trained on the original rows; the last layer is fitted on the "
           "validation rows plus the generated rows",
    "groupdro": "joined to the training set, one group per class (augmented:<class>)",
    "clarify": "their own slice per class (<class>|generated) in the slice-balanced training",
    "slim": "joined to the curated set as they are (not screened)",
}
MODEL_SELECTION = {  # the trainers that do not report their own rule in extras["selection"]
    "erm": "the epoch with the best worst-group validation accuracy (average accuracy when val has no groups)",
    "jtt": "stage 2: the epoch with the best worst-group validation accuracy",
    "groupdro": "the epoch with the best worst-group validation accuracy",
    "dfr": "C with the best worst-group accuracy on one half of the validation set",
}
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
    if any(l["data"] == "augmented" for l in lines):
        out += ["", "Where the generated images go (ASPIRE App. A.4): " + "; ".join(
            f"{METHOD_NAMES.get(m, m)}: {GENERATED_IMAGES_GO[m]}" for m in dict.fromkeys(l["method"] for l in lines)
            if m in GENERATED_IMAGES_GO) + "."]
    rules = {m: MODEL_SELECTION[m] for m in dict.fromkeys(l["method"] for l in lines)
             if m in MODEL_SELECTION and not any(x.get("selection") for x in lines if x["method"] == m)}
    if rules:  # not the run's own ERM rows of report.md, which keep the last epoch
        out += ["", "Model selection: " + "; ".join(f"{METHOD_NAMES.get(m, m)}: {r}" for m, r in rules.items()) + "."]
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
    (Path(workdir) / "report.md").write_text(render_markdown(report, figure_files(workdir)))


def figure_files(workdir: Path) -> dict[str, str]:
    """The figures written for this report (file names relative to ``workdir``, as report.md links them)."""
    return {key: name for key, name in FIGURES.items() if (Path(workdir) / name).is_file()}


INLINE_BUDGET = 900_000  # bytes of PNG in all: base64 (4/3) keeps the artifact under Prefect's 1.5 MB event limit


def inline_figures(workdir: Path, budget: int = INLINE_BUDGET) -> dict[str, str]:
    """The report's figures as ``data:`` URIs, which the Prefect UI's markdown renders inline (a file path would
    point at the machine that ran the flow).

    Prefect refuses to publish an artifact event over 1.5 MB of JSON (the UI still shows the artifact, but the
    event and any automation on it are lost), and the edit grid of a run with many classes is over 1 MB of PNG.
    So each figure gets an equal share of ``budget``; one over its share is sent as a JPEG (quality 85), scaled
    down by 0.8 in width and height until it fits. The files on disk (linked from report.md) stay as written.
    """
    names = figure_files(workdir)
    share = budget // max(1, len(names))
    uris = {}
    for key, name in names.items():
        path = Path(workdir) / name
        data, kind = path.read_bytes(), "png"
        if len(data) > share:
            with Image.open(path) as image:
                image, kind, scale = image.convert("RGB"), "jpeg", 1.0
                while True:
                    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    buffer = io.BytesIO()
                    image.resize(size, Image.LANCZOS).save(buffer, format="JPEG", quality=85)
                    data = buffer.getvalue()
                    if len(data) <= share or min(size) <= 32:
                        break
                    scale *= 0.8
        uris[key] = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
    return uris
