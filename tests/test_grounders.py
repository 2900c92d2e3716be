"""Grounders on CPU: the boxes column, and tiny random-weight Grounding DINOs (transformers and groundingdino-py)
built from configs and loaded from files by the real loading code (nothing downloaded)."""

import argparse
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from aspire.config import RemoveConfig
from tasks.grounders import (
    AnnotationsGrounder,
    GroundingDinoPy,
    HFGroundingDino,
    assign_boxes,
    grounder_identity,
    load_grounder,
    phrase_spans,
    prompt_phrases,
)
from tasks.vision import Detection

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: a bad hub id fails at once, offline

WORDS = "dog sled orange snow man two tree".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
TINY_BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=64)


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return folder / "vocab.txt"


def inside(detection: Detection, size: tuple[int, int]) -> bool:
    x0, y0, x1, y1 = detection.box
    return 0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]


# -- annotations ---------------------------------------------------------------------------------------------


@pytest.fixture()
def annotated_row(tmp_path: Path) -> dict:
    path = tmp_path / "img.png"
    Image.new("RGB", (200, 100), "white").save(path)
    boxes = [{"phrase": "sled", "box": [10, 20, 110, 60]}, {"phrase": "two dogs", "box": [120, 0, 200, 100]}]
    return {"image_id": "a", "path": str(path), "boxes": boxes}


def test_annotations_match_by_root_words(annotated_row: dict) -> None:
    image = Image.open(annotated_row["path"]).convert("RGB")
    got = AnnotationsGrounder().ground(image, ["orange sled", "two sleds", "dog", "snow"], annotated_row)
    assert {(d.phrase, tuple(d.box)) for d in got} == {
        ("orange sled", (10, 20, 110, 60)), ("two sleds", (10, 20, 110, 60)), ("dog", (120, 0, 200, 100))}
    assert all(d.score == 1.0 for d in got)
    assert AnnotationsGrounder().ground(image, ["snow", "man"], annotated_row) == []
    assert AnnotationsGrounder().ground(image, ["sled"], {"image_id": "b", "path": annotated_row["path"]}) == []


def test_annotations_scale_to_a_downscaled_image(annotated_row: dict) -> None:
    small = Image.new("RGB", (100, 50))
    (det,) = AnnotationsGrounder().ground(small, ["sled"], annotated_row)
    assert det.box == pytest.approx([5, 10, 55, 30])


# -- shared helpers ------------------------------------------------------------------------------------------


def test_prompt_spans_and_assignment() -> None:
    assert prompt_phrases(["Orange Sled.", "dog", "orange sled", "", "?"]) == ["orange sled", "dog"]
    # [CLS] orange sled . dog . [SEP]  (ids: cls=2, sep=3, "."=5)
    spans = phrase_spans([2, 8, 7, 5, 6, 5, 3], {2, 3, 5, 0}, 2)
    assert spans == [[1, 2], [4]]
    probs = torch.zeros(3, 8)
    probs[0, 2], probs[0, 4] = 0.9, 0.5  # "sled" token wins -> orange sled
    probs[1, 4] = 0.6  # dog
    probs[2, 1] = 0.1  # below the text threshold -> dropped
    boxes = [[-5, 0, 50, 40], [10, 10, 20, 20], [0, 0, 5, 5]]
    got = assign_boxes(probs, boxes, spans, ["orange sled", "dog"], ["Orange Sled.", "dog"], (40, 30), 0.25)
    assert got == [Detection("Orange Sled.", [0.0, 0.0, 40.0, 30.0], pytest.approx(0.9)),
                   Detection("dog", [10.0, 10.0, 20.0, 20.0], pytest.approx(0.6))]


# -- transformers Grounding DINO -----------------------------------------------------------------------------


def save_tiny_hf_grounding_dino(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        ResNetConfig,
    )

    tokenizer = BertTokenizerFast(str(write_vocab(folder.parent / f"{folder.name}-vocab")))
    # >= 128 px: the extra feature level of a smaller image is 1x1, which GroupNorm refuses
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)  # decoder_layers >= 2: 1 fails on tied weights
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    return save_tiny_hf_grounding_dino(tmp_path_factory.mktemp("hf") / "gdino")


def hf_config(folder: Path | str, **kw) -> RemoveConfig:
    return RemoveConfig(ground="hf-grounding-dino", ground_model=str(folder), box_threshold=0.0,
                        text_threshold=0.0, device="cpu", **kw)


def test_hf_grounding_dino_one_forward_for_all_phrases(hf_model_dir: Path) -> None:
    grounder = load_grounder(hf_config(hf_model_dir, grounding="joint"))
    assert isinstance(grounder, HFGroundingDino)
    phrases = ["dog", "Orange Sled", "snow"]
    image = Image.new("RGB", (120, 90), (200, 120, 40))
    detections = grounder.ground(image, phrases, {})
    assert detections and grounder.forward_calls == 1
    assert {d.phrase for d in detections} <= set(phrases)
    assert all(inside(d, image.size) for d in detections)
    assert load_grounder(hf_config(hf_model_dir, dilate=3, grounding="joint")) is grounder  # grounding settings only
    assert grounder.ground(image, [], {}) == [] and grounder.forward_calls == 1


def test_grounding_input_size_is_config(hf_model_dir: Path, gdino_files) -> None:
    """remove.ground_size / ground_max_size: CPU users trade accuracy for time (issue 14); None keeps the model's."""
    image = Image.new("RGB", (120, 90))
    hf = load_grounder(hf_config(hf_model_dir, ground_size=144, ground_max_size=400))
    assert hf.processor(images=image, text="dog.", return_tensors="pt")["pixel_values"].shape[-2:] == (144, 192)
    assert load_grounder(hf_config(hf_model_dir)).processor.image_processor.size != hf.processor.image_processor.size
    py = load_grounder(gd_config(gdino_files, ground_size=128, ground_max_size=160))
    assert py.transform(Image.new("RGB", (320, 200))).shape == (3, 100, 160)  # the longer side capped at 160
    assert GroundingDinoPy(gd_config(gdino_files, ground_size=None)).transform(image).shape == (3, 800, 1066)


def test_per_phrase_grounding_is_the_default_one_forward_per_phrase(hf_model_dir: Path) -> None:
    """ASPIRE's Algorithm 1 grounds each phrase alone: what a phrase gets does not depend on the others."""
    assert RemoveConfig().grounding == "per-phrase"
    grounder = load_grounder(hf_config(hf_model_dir))
    assert grounder is not load_grounder(hf_config(hf_model_dir, grounding="joint"))
    image = Image.new("RGB", (120, 90), (200, 120, 40))
    detections = grounder.ground(image, ["dog", "Orange Sled", "snow", "dog"], {})
    assert grounder.forward_calls == 3  # the repeated phrase is grounded once
    alone = grounder.ground(image, ["snow"], {})
    assert [d for d in detections if d.phrase == "snow"] == alone
    assert grounder_identity(hf_config(hf_model_dir)) != grounder_identity(hf_config(hf_model_dir, grounding="joint"))


def test_hf_grounding_dino_bad_model_and_identity(hf_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="remove.ground_model"):
        load_grounder(hf_config(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="remove.ground_model"):
        load_grounder(hf_config(tmp_path / "empty"))
    other = save_tiny_hf_grounding_dino(tmp_path / "other", seed=0)
    before = grounder_identity(hf_config(other))
    assert before.startswith("hf-grounding-dino:") and before == grounder_identity(hf_config(other))
    save_tiny_hf_grounding_dino(other, seed=1)  # retrained weights, same files
    assert grounder_identity(hf_config(other)) != before
    assert grounder_identity(hf_config("IDEA-Research/grounding-dino-tiny")).startswith(
        "hf-grounding-dino:IDEA-Research/grounding-dino-tiny:")
    assert grounder_identity(RemoveConfig(ground="annotations")) == "annotations"


# -- groundingdino-py ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gdino_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config .py, checkpoint .pth, local BERT folder) of a randomly initialised groundingdino-py model."""
    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("gdino")
    bert = root / "bert"
    tokenizer = BertTokenizer(str(write_vocab(bert)))
    tokenizer.save_pretrained(bert)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT)).save_pretrained(bert)
    source = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    text = source.read_text()
    for old, new in (("enc_layers = 6", "enc_layers = 1"), ("dec_layers = 6", "dec_layers = 1"),
                     ("num_queries = 900", "num_queries = 30"), ("use_checkpoint = True", "use_checkpoint = False"),
                     ("use_transformer_ckpt = True", "use_transformer_ckpt = False")):
        assert old in text
        text = text.replace(old, new)  # hidden_dim stays 256 (hard-coded in the text position embedding)
    config = root / "tiny_swint.py"
    config.write_text(text.replace('"bert-base-uncased"', repr(str(bert))))
    args = SLConfig.fromfile(str(config))
    args.device = "cpu"
    torch.manual_seed(0)
    checkpoint = root / "tiny.pth"
    torch.save({"model": build_model(args).state_dict(), "args": argparse.Namespace(seed=0)}, checkpoint)
    return config, checkpoint, bert


def gd_config(files: tuple[Path, Path, Path], **kw) -> RemoveConfig:
    config, checkpoint, bert = files
    fields = dict(ground="groundingdino", groundingdino_config=config, groundingdino_checkpoint=checkpoint,
                  text_encoder=str(bert), box_threshold=0.0, text_threshold=0.0, device="cpu",
                  ground_size=160)  # >= 128 px: smaller fails in GroupNorm
    return RemoveConfig(**{**fields, **kw})


def test_groundingdino_py_one_forward_for_all_phrases(gdino_files) -> None:
    grounder = load_grounder(gd_config(gdino_files, grounding="joint"))
    assert isinstance(grounder, GroundingDinoPy)
    assert grounder.transform(Image.new("RGB", (320, 200))).shape == (3, 160, 256)
    image = Image.new("RGB", (160, 160), (30, 90, 200))
    detections = grounder.ground(image, ["two dogs", "sled"], {})
    assert detections and grounder.forward_calls == 1
    assert {d.phrase for d in detections} <= {"two dogs", "sled"}
    assert all(inside(d, image.size) for d in detections)


def test_groundingdino_py_bad_paths_and_identity(gdino_files, tmp_path: Path) -> None:
    config, checkpoint, _ = gdino_files
    with pytest.raises(ValueError, match="remove.groundingdino_checkpoint"):
        load_grounder(gd_config(gdino_files, groundingdino_checkpoint=tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="remove.groundingdino_checkpoint"):
        grounder_identity(gd_config(gdino_files, groundingdino_checkpoint=None))
    with pytest.raises(ValueError, match="remove.groundingdino_config"):
        load_grounder(gd_config(gdino_files, groundingdino_config=tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="remove.text_encoder"):
        load_grounder(gd_config(gdino_files, text_encoder=str(tmp_path / "no-bert")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="remove.groundingdino_checkpoint"):
        GroundingDinoPy(gd_config(gdino_files, groundingdino_checkpoint=tmp_path / "junk.pth"))
    copy = tmp_path / "copy.pth"
    copy.write_bytes(checkpoint.read_bytes())
    before = grounder_identity(gd_config(gdino_files, groundingdino_checkpoint=copy))
    assert before == grounder_identity(gd_config(gdino_files))  # content, not path
    with open(copy, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"0123456789")
    assert grounder_identity(gd_config(gdino_files, groundingdino_checkpoint=copy)) != before
    assert grounder_identity(gd_config(gdino_files, box_threshold=0.5)) != before
