"""The run report: groups that got worse after augmentation, and classes with no spurious feature claimed."""

import base64
import io
import json

import numpy as np
from PIL import Image

from aspire.report import FIGURES, build_report, inline_figures, render_markdown, worse_groups


def evaluation(per_group: dict[str, float]) -> dict:
    worst = min(per_group, key=per_group.get)
    return {"avg_acc": sum(per_group.values()) / len(per_group), "worst_group_acc": per_group[worst],
            "worst_group": worst, "per_group": per_group, "n": 10 * len(per_group),
            "group_sizes": {g: 10 for g in per_group}}


def test_groups_more_than_five_points_worse_are_listed():
    before = evaluation({"cat/grass": 1.0, "cat/sofa": 0.2, "fox/grass": 0.9})
    after = evaluation({"cat/grass": 0.94, "cat/sofa": 0.9, "fox/grass": 0.86})
    assert worse_groups(before, after) == {"cat/grass": {"before": 1.0, "after": 0.94, "images": 10, "lost": None,
                                                         "gained": None, "p": None}}  # 6 points; fox's 4 are not
    assert worse_groups(before, None) == {}


def test_a_worse_group_says_how_likely_chance_alone_made_its_drop():
    """Paired by image: lost = right before and wrong after. McNemar's exact one-sided p: 8 lost, 0 gained is
    0.5 ** 8; 3 lost, 2 gained is as likely as not."""
    from aspire.metrics import chance_of_losing, paired_changes

    def row(image_id, group, label, pred, split="test"):
        return {"image_id": image_id, "group": group, "group_name": "cat|grass", "label": label, "pred": pred,
                "split": split, "class_name": "cat"}

    before = [row("a", 0, 1, 1), row("b", 0, 1, 1), row("c", 0, 1, 0), row("d", 0, 1, 1), row("v", 0, 1, 1, "val")]
    after = [row("a", 0, 1, 0), row("b", 0, 1, 0), row("c", 0, 1, 1), row("d", 0, 1, 1), row("v", 0, 1, 0, "val"),
             row("new", 0, 1, 0)]  # not in the model before: left out
    assert paired_changes(before, after) == {"0:cat|grass": [2, 1]}
    assert chance_of_losing(8, 0) == 0.5 ** 8 and chance_of_losing(3, 2) == 0.5 and chance_of_losing(0, 0) == 1.0
    assert chance_of_losing(0, 4) == 1.0 and chance_of_losing(4, 4) == 163 / 256
    was = evaluation({"cat/grass": 1.0, "fox/grass": 0.9})
    now = evaluation({"cat/grass": 0.2, "fox/grass": 0.9})
    worse = worse_groups(was, now, {"cat/grass": [8, 0], "fox/grass": [1, 1]})
    assert worse == {"cat/grass": {"before": 1.0, "after": 0.2, "images": 10, "lost": 8, "gained": 0, "p": 0.5 ** 8}}
    report = build_report({"holdout": {"before": {"test": was}},
                           "retrain": {"after": {"test": now}, "test_changes": {"cat/grass": [8, 0]}}})
    text = render_markdown(report)
    assert "cat/grass 100.0% -> 20.0% (10 images: 8 lost, 0 gained, p = 0.0039)" in text
    assert "McNemar's exact test, one-sided" in text


def test_a_worse_group_says_where_its_images_went_and_whether_its_accuracy_came_from_the_context():
    was = evaluation({"cat/grass": 1.0, "fox/sofa": 1.0, "owl/tree": 0.5})
    now = evaluation({"cat/grass": 0.7, "fox/sofa": 0.8, "owl/tree": 0.9})
    lost = {"cat/grass": {"lost_to": {"fox": 2, "owl": 1}, "context": {"images": 20, "before": 0.95, "after": 0.1}},
            "fox/sofa": {"lost_to": {"cat": 2}, "context": None}, "owl/tree": {"lost_to": {"cat": 1}, "context": None}}
    report = build_report({"holdout": {"before": {"test": was}},
                           "retrain": {"after": {"test": now}, "test_changes": {"cat/grass": [3, 0], "fox/sofa": [2, 0]},
                                       "test_lost": lost}})
    worse = report["worse_groups"]
    assert set(worse) == {"cat/grass", "fox/sofa"} and worse["cat/grass"]["from_context"]
    assert worse["fox/sofa"]["lost_to"] == {"cat": 2} and not worse["fox/sofa"]["from_context"]
    text = render_markdown(report)
    assert ("cat/grass 100.0% -> 70.0% (10 images: 3 lost, 0 gained, p = 0.12; lost to fox 2, owl 1; other "
            "classes' images with its context given its class: 95.0% -> 10.0% of 20: its accuracy before came "
            "from the context)") in text
    assert "fox/sofa 100.0% -> 80.0% (10 images: 2 lost, 0 gained, p = 0.25; lost to cat 2)" in text
    assert "losing some of the group is the cost of no longer following it" in text
    calm = {"lost_to": {"fox": 2}, "context": {"images": 20, "before": 0.3, "after": 0.1}}
    assert not worse_groups(was, now, None, {"cat/grass": calm})["cat/grass"]["from_context"]


def test_a_worse_group_lost_to_a_shortcut_says_whether_augmentation_made_it():
    """The lost images went to fox, and the model after calls fox most images with their context that are
    neither cat nor fox: a new shortcut when the model before did not, a kept one when it did."""
    was = evaluation({"cat/grass": 1.0, "fox/sofa": 1.0})
    now = evaluation({"cat/grass": 0.7, "fox/sofa": 1.0})
    drawn = {"class": "fox", "of": "cat", "images": 12, "before": 0.25, "after": 0.75}
    lost = {"cat/grass": {"lost_to": {"fox": 3}, "context": {"images": 20, "before": 0.1, "after": 0.0},
                          "drawn_to": drawn}}
    report = build_report({"holdout": {"before": {"test": was}},
                           "retrain": {"after": {"test": now}, "test_changes": {"cat/grass": [3, 0]}, "test_lost": lost}})
    worse = report["worse_groups"]["cat/grass"]
    assert worse["shortcut"] == "new" and not worse["from_context"]
    text = render_markdown(report)
    assert ("lost to fox 3; other classes' images with its context given its class: 10.0% -> 0.0% of 20; images "
            "with its context that are neither cat nor fox given fox: 25.0% -> 75.0% of 12: the model after follows "
            "the context to fox, the model before did not (a new shortcut))") in text
    assert "a new shortcut when the model before did not" in text

    def verdict(**changed):
        entry = {**lost["cat/grass"], "drawn_to": {**drawn, **changed}}
        return worse_groups(was, now, None, {"cat/grass": entry})["cat/grass"]["shortcut"]

    assert verdict(before=0.6) == "kept" and verdict(after=0.4) is None
    assert verdict(images=4) is None  # too few images of the context to say
    # a summary committed before the test: no verdict at all (not "no shortcut")
    old = {k: v for k, v in lost["cat/grass"].items() if k != "drawn_to"}
    assert "shortcut" not in worse_groups(was, now, None, {"cat/grass": old})["cat/grass"]


def test_report_shows_the_rule_flip_rates_and_the_classes_without_a_feature():
    collapse = {"spurious": {"cat": [["ball"]]}, "no_spurious_found": ["fox"], "rule": "RULE",
                "top_k": {"cat": [{"phrases": ["ball"], "count": 12, "tried": 40, "flip_rate": 0.3, "confident": True,
                                   "mentioned": 0.8, "mentioned_elsewhere": 0.1},
                                  {"phrases": ["grass"], "count": 6, "tried": 200, "flip_rate": 0.03, "confident": False}],
                          "fox": [{"phrases": ["rock"], "count": 4, "tried": 30, "flip_rate": 0.1333, "confident": False}]},
                "flipped": {}}
    before = evaluation({"cat/grass": 1.0, "fox/grass": 0.9})
    after = evaluation({"cat/grass": 0.5, "fox/grass": 0.9})
    report = build_report({"holdout": {"before": {"test": before}}, "collapse": collapse, "retrain": {"after": {"test": after}}})
    assert report["worse_groups"]["cat/grass"]["after"] == 0.5 and report["no_spurious_found"] == ["fox"]
    text = render_markdown(report)
    assert "Rule: RULE" in text and "| cat | 1 | 12 / 40 | 30.0% | 80.0% / 10.0% | yes | ball |" in text
    assert "| cat | 2 | 6 / 200 | 3.0% | n/a / n/a | no | grass |" in text
    assert "**fox: no spurious feature found**" in text and "cat/grass 100.0% -> 50.0% (10 images)" in text


def test_tables_keep_their_cells_when_group_names_hold_pipes():
    from markdown_it import MarkdownIt

    from aspire.report import render_robust

    before = evaluation({"2:dog|snow|+sled": 0.0, "3:dog|water|-sled": 0.5})
    after = evaluation({"2:dog|snow|+sled": 0.8, "3:dog|water|-sled": 0.9})
    text = render_markdown(build_report({"holdout": {"before": {"test": before}}, "retrain": {"after": {"test": after}}}))
    robust = {"grouping": {"original": {"groups": "labels"}},
              "lines": [{"method": "erm", "data": "original", "seeds": 1, "avg_acc": 0.5, "avg_std": 0.0,
                         "worst_group_acc": 0.0, "worst_std": 0.0, "per_group": before["per_group"]}]}
    text += "\n\n" + "\n".join(render_robust(robust))
    tokens = MarkdownIt().enable("table").parse(text)
    rows, cells = [], 0
    for token in tokens:
        if token.type == "tr_open":
            cells = 0
        elif token.type in ("td_open", "th_open"):
            cells += 1
        elif token.type == "tr_close":
            rows.append(cells)
    headers = [i for i, t in enumerate(tokens) if t.type == "thead_open"]
    assert len(headers) >= 3 and rows  # the accuracy table, the per-group table, the robust tables
    inline = [t.content for t in tokens if t.type == "inline"]
    assert "2:dog|snow|+sled" in inline and "0.0% (2:dog|snow|+sled)" in inline  # one cell, the pipes kept
    per_group = [row for row in rows if row == 3]
    assert len(per_group) >= 3  # group | before | after, for the header and both groups
    assert "80.0%" in inline and "90.0%" in inline  # the after numbers did not fall out of their cells


def test_figures_come_as_png_svg_pdf_and_the_grid_says_what_was_edited(tmp_path):
    from PIL import Image

    from aspire.report import write_report

    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16), "white").save(tmp_path / f"{name}.png")
    original = {"image_id": "o", "path": str(tmp_path / "a.png"), "label": 0, "class_name": "cat", "pred": 0}
    edits = [{"image_id": "e1", "source_image_id": "o", "path": str(tmp_path / "b.png"), "label": 0, "class_name": "cat",
              "phrase": "ball", "alt": None, "pred": 1, "kept": True},
             {"image_id": "e2", "source_image_id": "o", "path": str(tmp_path / "c.png"), "label": 0, "class_name": "cat",
              "phrase": "grass", "alt": "sand", "pred": 1, "kept": True}]
    fox = {"image_id": "f", "path": str(tmp_path / "a.png"), "label": 1, "class_name": "fox", "pred": 1}
    collapse = {"spurious": {"cat": [["ball"]]}, "no_spurious_found": ["fox"], "rule": "RULE",
                "top_k": {"cat": [{"phrases": ["ball"], "count": 12, "tried": 40, "flip_rate": 0.3, "confident": True}],
                          "fox": [{"phrases": ["rock"], "count": 1, "tried": 30, "flip_rate": 0.03, "confident": False}]},
                "flipped": {}}
    before = evaluation({"cat/grass": 1.0, "fox/grass": 0.0})
    report = write_report(tmp_path / "run", {"holdout": {"before": {"test": before}}, "collapse": collapse},
                          [original, fox, *edits])
    for stem in ("accuracy", "top_k"):
        assert all((tmp_path / "run" / f"{stem}{suffix}").stat().st_size > 0 for suffix in (".png", ".svg", ".pdf"))
    assert (tmp_path / "run" / "edits.png").is_file()
    text = (tmp_path / "run" / "report.md").read_text()
    assert "![top-k groups per class](top_k.png)" in text and "![per-group accuracy](accuracy.png)" in text
    svg = (tmp_path / "run" / "accuracy.svg").read_text()
    assert "worst before: 0%" in svg  # the worst group is marked on the chart
    assert report["no_spurious_found"] == ["fox"]


def test_a_report_left_half_written_by_a_killed_run_is_swept_when_the_report_is_written_again(tmp_path):
    from aspire.report import write_report

    summaries = {"holdout": {"before": {"test": evaluation({"cat/grass": 1.0, "fox/grass": 0.0})}}}
    (tmp_path / "run").mkdir()
    dead = tmp_path / "run" / ".report.json.tmp-dead"
    dead.write_text('{"half')
    write_report(tmp_path / "run", summaries)
    assert not dead.exists() and not list((tmp_path / "run").glob("*.tmp-*"))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["before"]["worst_group_acc"] == 0.0


def test_robust_table_says_where_each_method_puts_the_generated_images():
    from aspire.report import render_robust

    line = {"seeds": 1, "avg_acc": 0.5, "avg_std": 0.0, "worst_group_acc": 0.1, "worst_std": 0.0, "per_group": {}}
    robust = {"grouping": {"original": {"groups": "labels"}, "augmented": {"groups": "labels"}},
              "lines": [{**line, "method": m, "data": d} for m in ("jtt", "dfr") for d in ("original", "augmented")]}
    text = "\n".join(render_robust(robust))
    assert "JTT: stage 2 only: the error set is identified on the original rows" in text
    assert "DFR: stage 2 only: the base ERM model is trained on the original rows" in text


def test_each_erm_row_names_its_selection_rule():
    from aspire.report import render_robust

    before = evaluation({"cat/grass": 1.0, "fox/grass": 0.9})
    text = render_markdown(build_report({"holdout": {"before": {"test": before}}, "retrain": {"after": {"test": before}}}))
    assert "| before (ERM, last epoch) |" in text and "| after (ERM retrained on the augmented set, last epoch) |" in text
    line = {"seeds": 1, "avg_acc": 0.5, "avg_std": 0.0, "worst_group_acc": 0.1, "worst_std": 0.0, "per_group": {},
            "method": "erm", "data": "original"}
    robust = "\n".join(render_robust({"grouping": {"original": {"groups": "labels"}}, "lines": [line]}))
    assert "Model selection: ERM: the epoch with the best worst-group validation accuracy" in robust


def test_figures_inlined_for_the_ui_fit_prefects_event_limit_and_the_files_keep_their_size(tmp_path):
    # noise does not compress: a 1200 px grid is ~4 MB of PNG, as the edit grid of a many-class run can be
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1200, 1200, 3), dtype=np.uint8)).save(tmp_path / FIGURES["grid"])
    Image.fromarray(np.full((200, 300, 3), 255, dtype=np.uint8)).save(tmp_path / FIGURES["chart"])
    size = (tmp_path / FIGURES["grid"]).stat().st_size
    uris = inline_figures(tmp_path, budget=600_000)
    assert set(uris) == {"grid", "chart"}
    decoded = {key: base64.b64decode(uri.split(",", 1)[1]) for key, uri in uris.items()}
    assert len(decoded["grid"]) <= 300_000 < size == (tmp_path / FIGURES["grid"]).stat().st_size
    assert decoded["chart"] == (tmp_path / FIGURES["chart"]).read_bytes()  # under its share: as written
    with Image.open(io.BytesIO(decoded["grid"])) as small:
        assert small.format == "JPEG" and small.width < 1200 and small.width == small.height  # smaller, same aspect
    assert sum(len(uri) for uri in uris.values()) < 1_500_000


def test_the_report_says_how_many_images_each_class_learned_from_and_how_many_it_generated():
    generate = {"planned": {"cat": 800, "fox": 800, "owl": 400}, "exemplars": {"cat": 7, "fox": 64},
                "skipped": {"owl": "nothing to learn from: only 1 kept edits (< min_images)"}}
    text = render_markdown(build_report({"generate": generate}))
    assert "| cat | 800 | 7 | 114 |" in text and "| fox | 800 | 64 | 12 |" in text
    assert "| owl | 0 (nothing to learn from: only 1 kept edits (< min_images)) | ? | - |" in text
    # textual inversion: the images each class's token was trained on
    personalize = {"learned_from": {"cat": {"rule": "top-k", "images": ["a.png", "b.png", "c.png"]}}}
    report = build_report({"personalize": personalize, "generate": {"planned": {"cat": 30}}})
    assert report["generation"] == {"cat": {"planned": 30, "learned_from": 3, "skipped": None}}
    assert "## Generation" not in render_markdown(build_report({"generate": {"planned": {}}}))
