"""The background stage with the composite editor and a background bank; the collapse stage's top-k."""

from pathlib import Path

import numpy as np
from PIL import Image

from aspire.config import BackgroundConfig, CollapseConfig, RemoveConfig
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


def test_composite_keeps_the_foreground_and_flips_on_a_red_desert(tmp_path):
    config = BackgroundConfig(backend="composite", bank=bank(tmp_path), batch_size=2)
    remove = RemoveConfig(ground="annotations", segment="box", dilate=0)
    editor = CompositeEditor(config, remove, AnnotationsGrounder(), BoxSegmenter())
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
    forest = edits["to-forest"]  # no forest in the bank: a background unlike snow is pasted instead
    assert forest["skip_reason"] is None and forest["alt"] == "forest" and forest["alt_used"] == "desert"
    assert desert["alt_used"] == "desert"
    assert edits["no-bg"]["skip_reason"] == "no background"


def test_collapse_keeps_top_k_groups_and_annotates_kept_edits():
    def edit(i, cls, phrase, kept=True):
        return {"image_id": f"e{i}", "source": "edit-remove", "class_name": cls, "phrase": phrase, "kept": kept,
                "skip_reason": None}

    rows = [edit(0, "dog", "sled"), edit(1, "dog", "orange sled"), edit(2, "dog", "snow"), edit(3, "dog", "snowy field"),
            edit(4, "dog", "snow"), edit(5, "dog", "tree"), edit(6, "dog", "man", kept=False),
            {"image_id": "o", "source": "original", "class_name": "dog"}]
    out, summary = run_collapse(rows, CollapseConfig(embedder="bow", top_k=2), BowEmbedder())
    assert summary["spurious"] == {"dog": [["snow", "snowy field"], ["sled", "orange sled"]]}
    assert [r["spurious_group"] for r in out] == [1, 1, 0, 0, 0, None, None, None]
    assert summary["flipped"]["dog"]["man"] == {"tried": 1, "kept": 0}
    found = planted_found(SynthConfig(), {"dog": summary["spurious"]["dog"], "bird": [["lake"]]})
    assert found["dog"] == {"object": True, "background": True}
    assert found["bird"] == {"object": False, "background": True} and found["car"] == {"object": False, "background": False}
