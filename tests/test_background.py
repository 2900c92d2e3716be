"""The background stage with the composite editor and a background bank; the collapse stage's top-k."""

from pathlib import Path

import numpy as np
from PIL import Image

from aspire.config import BackgroundConfig, CollapseConfig
from aspire.phrases import BowEmbedder
from aspire.synth import SynthConfig, planted_found
from tasks.background import BackgroundBank, CompositeEditor, run_background
from tasks.collapse import run_collapse
from tasks.grounders import AnnotationsGrounder
from tasks.segmenters import BoxSegmenter
from test_remove import CLASSIFIER, picture, row


def bank(tmp_path: Path) -> Path:
    root = tmp_path / "bank"
    for name, colour in (("desert", (230, 20, 20)), ("snowy_field", (240, 240, 250))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


def test_bank_matches_names_by_stems(tmp_path):
    b = BackgroundBank(bank(tmp_path))
    assert b.folder("desert").name == "desert" and b.folder("a snowy field").name == "snowy_field"
    assert b.folder("snow field").name == "snowy_field" and b.folder("forest") is None
    assert b.pick("desert", "x") == b.pick("desert", "x")


def test_bank_falls_back_on_what_looks_unlike_the_image_not_on_names(tmp_path):
    b = BackgroundBank(bank(tmp_path))
    reddish = np.tile(np.array([[210, 40, 30]], np.uint8), (50, 1))
    whitish = np.tile(np.array([[235, 235, 240]], np.uint8), (50, 1))
    assert {b.unlike(reddish, f"k{i}") for i in range(5)} == {"snowy field"}
    assert {b.unlike(whitish, f"k{i}") for i in range(5)} == {"desert"}


def test_composite_keeps_the_foreground_and_flips_on_a_red_desert(tmp_path):
    config = BackgroundConfig(backend="composite", bank=bank(tmp_path), batch_size=2)
    editor = CompositeEditor(config, AnnotationsGrounder(), BoxSegmenter())
    gray = picture(tmp_path / "gray.png", red_box=None)
    rows = [row("to-desert", gray, [], [{"phrase": "a", "box": [24, 24, 40, 40]}], background="snow", alt="desert"),
            row("to-forest", gray, [], [{"phrase": "a", "box": [24, 24, 40, 40]}], background="snow", alt="forest"),
            row("no-bg", gray, [], [], background="", alt="")]
    for r in rows:
        r["label"] = 1  # the rule classifier says 1 on gray, 0 once the red desert is pasted in
    result = run_background(rows, config, editor, CLASSIFIER, tmp_path)
    edits = {r["source_image_id"]: r for r in result.rows if r.get("source") == "edit-background"}
    desert = edits["to-desert"]
    assert desert["kept"] and desert["phrase"] == "snow" and desert["alt"] == "desert"
    pixels = np.asarray(Image.open(desert["path"]))
    assert tuple(pixels[30, 30]) == (128, 128, 128) and tuple(pixels[2, 2]) == (230, 20, 20)
    # no ring of the old background around the pasted foreground, as InstructPix2Pix redraws up to the object
    assert tuple(pixels[30, 39]) == (128, 128, 128) and tuple(pixels[30, 40]) == (230, 20, 20)
    forest = edits["to-forest"]  # no forest in the bank: the bank background that looks least like gray
    assert forest["skip_reason"] is None and forest["alt"] == "forest" and forest["alt_used"] == "snowy field"
    assert desert["alt_used"] == "desert"
    assert edits["no-bg"]["skip_reason"] == "no background"


def test_collapse_keeps_top_k_groups_and_annotates_kept_edits():
    def edit(i, cls, phrase, kept=True):
        return {"image_id": f"e{i}", "source": "edit-remove", "class_name": cls, "phrase": phrase, "kept": kept,
                "skip_reason": None}

    rows = [edit(0, "dog", "sled"), edit(1, "dog", "orange sled"), edit(2, "dog", "snow"), edit(3, "dog", "snowy field"),
            edit(4, "dog", "snow"), edit(5, "dog", "tree"), edit(6, "dog", "man", kept=False),
            {"image_id": "o", "source": "original", "class_name": "dog"}]
    out, summary = run_collapse(rows, CollapseConfig(embedder="bow", top_k=2, min_flips=1, min_lift=0), BowEmbedder())
    assert summary["spurious"] == {"dog": [["snow", "snowy field"], ["sled", "orange sled"]]}
    assert [r["spurious_group"] for r in out] == [1, 1, 0, 0, 0, None, None, None]
    assert summary["flipped"]["dog"]["man"] == {"tried": 1, "kept": 0}
    found = planted_found(SynthConfig(), {"dog": summary["spurious"]["dog"], "bird": [["lake"]]})
    assert found["dog"] == {"object": True, "background": True}
    assert found["bird"] == {"object": False, "background": True} and found["car"] == {"object": False, "background": False}


def test_collapse_claims_a_feature_only_when_enough_edits_flip():
    """Six flips of 200 'grass' edits (3%) is what a classifier leaning on nothing does: not a feature."""
    def edits(cls, phrase, tried, kept):
        return [{"image_id": f"{cls}-{phrase}-{i}", "source": "edit-remove", "class_name": cls, "phrase": phrase,
                 "kept": i < kept, "skip_reason": None} for i in range(tried)]

    rows = edits("cat", "grass", 200, 6) + edits("cat", "ball", 40, 12) + edits("fox", "rock", 30, 4) + \
        [{"image_id": "o1", "source": "original", "class_name": "cat"}, {"image_id": "o2", "source": "original", "class_name": "fox"}]
    out, summary = run_collapse(rows, CollapseConfig(embedder="bow", top_k=3, min_flips=5, min_flip_rate=0.05, min_lift=0), BowEmbedder())
    cat = {g["phrases"][0]: g for g in summary["top_k"]["cat"]}
    assert cat["ball"]["confident"] and cat["ball"]["flip_rate"] == 0.3 and cat["ball"]["tried"] == 40
    assert not cat["grass"]["confident"] and cat["grass"]["flip_rate"] == 0.03
    assert summary["spurious"] == {"cat": [["ball"]]} and summary["no_spurious_found"] == ["fox"]
    assert {r["spurious_group"] for r in out if r.get("phrase") == "grass"} == {None}
    # not claimed, but still one of the top-k groups the generator learns from (ASPIRE Algorithm 1's D_synth^k)
    grass = {r["top_k_group"] for r in out if r.get("phrase") == "grass" and r["kept"]}
    assert grass == {[g["phrases"][0] for g in summary["top_k"]["cat"]].index("grass")}
    assert {r["top_k_group"] for r in out if r.get("phrase") == "grass" and not r["kept"]} == {None}


def test_collapse_claims_only_features_the_class_s_captions_name_more_than_others():
    """'snow' flips many dog edits, but every class's captions name snow as often: the model's error, no claim.
    'sled' flips as many and is named by dog captions only: a spurious correlation."""
    def edits(phrase, tried, kept):
        return [{"image_id": f"{phrase}-{i}", "source": "edit-remove", "class_name": "dog", "phrase": phrase,
                 "kept": i < kept, "skip_reason": None} for i in range(tried)]

    def original(i, cls, foreground, background):
        return {"image_id": f"o{i}", "source": "original", "class_name": cls, "foreground": foreground,
                "background": background, "extract_error": None}

    rows = edits("snow", 40, 20) + edits("sled", 40, 20)
    rows += [original(i, "dog", ["sled"] if i < 8 else [], "snow" if i % 2 else "grass") for i in range(10)]
    rows += [original(10 + i, "cat", [], "snowy field" if i % 2 else "grass") for i in range(10)]
    _, summary = run_collapse(rows, CollapseConfig(embedder="bow", top_k=3), BowEmbedder())
    groups = {g["phrases"][0]: g for g in summary["top_k"]["dog"]}
    assert groups["sled"]["mentioned"] == 0.8 and groups["sled"]["mentioned_elsewhere"] == 0.0 and groups["sled"]["confident"]
    assert groups["snow"]["lift"] == 1.0 and not groups["snow"]["confident"]
    assert summary["spurious"] == {"dog": [["sled"]]} and summary["no_spurious_found"] == ["cat"]
