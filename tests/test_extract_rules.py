"""The offline ``rules`` extraction backend, the label filter, and extraction quality on labelled captions."""

import json
from pathlib import Path

import pytest

from aspire.config import ExtractConfig
from aspire.phrases import normalize_phrase, phrase_scores
from aspire.synth import SynthConfig, draw_benchmark
from tasks.extract import CaptionCache, label_forms, names_label, run_extract
from tasks.extract_rules import RulesExtractor

LABELLED = Path(__file__).parent / "data" / "extract_labelled.jsonl"


@pytest.fixture(scope="module")
def rules():
    return RulesExtractor(ExtractConfig(backend="rules"))


def test_paper_example(rules):
    result = rules.extract_one("A man with two dogs and a sled in the snow.")
    assert result.background == "snow" and result.alt == "desert"
    assert {"man", "two dogs", "sled"} <= set(result.foreground)


@pytest.mark.parametrize("caption, foreground, background", [
    ("a bird standing on a branch in the forest", ["bird", "branch"], "forest"),
    ("a teddy bear sitting on a bed in a bedroom", ["teddy bear", "bed"], "bedroom"),
    ("a flock of birds next to a yellow boat by the sea", ["flock of birds", "yellow boat"], "sea"),
    ("a close up of a keyboard and a mouse", ["keyboard", "mouse"], ""),
    ("a car parked on the street", ["car"], "street"),
])
def test_phrases_and_scene(rules, caption, foreground, background):
    result = rules.extract_one(caption)
    assert result.foreground == foreground and result.background == background
    assert bool(result.alt) == bool(background)


def test_label_filter_drops_the_class_and_its_synonyms(tmp_path, rules):
    assert names_label("two dogs", label_forms("dog")) and names_label("a dog team", label_forms("dog"))
    assert not names_label("hotdog stand", label_forms("dog"))
    assert names_label("a husky", label_forms("dog", ["husky"]))
    assert names_label("blond hair", label_forms("not_Blond_Hair")) and not names_label("hair", label_forms("Blond_Hair"))
    rows = [{"image_id": "a", "class_name": "dog", "caption": "a husky beside an orange sled in the snow"},
            {"image_id": "b", "class_name": "dog", "caption": None}]
    config = ExtractConfig(backend="rules", synonyms={"dog": ["husky"]})
    result = run_extract(rows, config, rules, CaptionCache(tmp_path))
    first, second = result.rows
    assert first["foreground"] == ["orange sled"] and first["label_phrases_dropped"] == 1
    assert first["background"] == "snow" and first["extract_error"] is None
    assert second["extract_error"] == "no caption" and result.stats["label_phrases_dropped"] == 1


def test_rules_recover_planted_object_and_background_on_the_synthetic_benchmark(tmp_path, rules):
    config = SynthConfig(image_size=32, train_per_class=150, val_per_group=1, test_per_group=1)
    rows = [r for r in draw_benchmark(config, tmp_path / "bench") if r["split"] == "train"]
    objects = {o.name: {normalize_phrase(w) for w in o.words} for o in config.objects}
    backgrounds = {b.name: {normalize_phrase(w.split(" ", 1)[1]) for w in b.words} for b in config.backgrounds}
    synonyms = {"dog": ["husky"]}
    result = run_extract(rows, ExtractConfig(backend="rules", synonyms=synonyms), rules, CaptionCache(tmp_path / "c"))
    hits = 0
    for row in result.rows:
        got = {normalize_phrase(p) for p in row["foreground"]}
        planted = config.classes[row["label"]].object
        object_ok = bool(got & objects[planted]) if row["has_object"] else not (got & objects[planted])
        background_ok = normalize_phrase(row["background"]) in backgrounds[row["scene"]]
        class_named = any(names_label(p, label_forms(row["class_name"], synonyms.get(row["class_name"], [])))
                          for p in row["foreground"])
        hits += object_ok and background_ok and not class_named
    assert hits / len(rows) >= 0.95, f"rules recovered {hits}/{len(rows)}"


def test_quality_on_labelled_captions(rules):
    items = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    predicted, backgrounds = [], 0
    for item in items:
        result = rules.extract_one(item["caption"])
        forms = label_forms(item["label"])
        predicted.append([p for p in result.foreground if not names_label(p, forms)])
        backgrounds += normalize_phrase(result.background) == normalize_phrase(item["background"])
    scores = phrase_scores([i["foreground"] for i in items], predicted)
    # measured 2026-11-24 (BENCHMARKS.md); a floor below it guards against regressions
    assert scores["precision"] >= 0.6 and scores["recall"] >= 0.6 and backgrounds / len(items) >= 0.75


@pytest.mark.parametrize("caption, foreground, background", [
    ("an old violin beside a ladder in the harbor", ["old violin", "ladder"], "harbor"),
    ("two glimbers with a rusty quandle on a frosk meadow", ["two glimbers", "rusty quandle"], "frosk meadow"),
    ("a photo of a vorp next to a teal zindle at the brungwick", ["vorp", "teal zindle"], "brungwick"),
    ("a plimm holding a trellet in his hand near the ostrow", ["plimm", "trellet", "hand"], "ostrow"),
    ("three yarrows on a blanket under a pergola", ["three yarrows", "blanket"], "pergola"),
])
def test_structure_not_vocabulary_decides_the_background(rules, caption, foreground, background):
    """Made-up words (in no file of the project): the place phrase after in/on/at/by/near/under is the
    background, every other noun phrase a foreground object, and a possessive place ("in his hand") is a thing."""
    result = rules.extract_one(caption)
    assert result.foreground == foreground and result.background == background
    assert result.alt  # the contrast table's fallback when it does not know the place
