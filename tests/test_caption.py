"""The caption stage on CPU with tiny random-weight GIT and BLIP models built from configs (nothing downloaded)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aspire.cache import StageStore
from aspire.config import CaptionConfig
from tasks.caption import (
    BlipCaptioner,
    GitCaptioner,
    MetadataCaptioner,
    captioner_identity,
    load_captioner,
    run_caption,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: a bad hub id fails at once, offline

WORDS = ("a an the dog cat bird bear on in of with water land grass tree sky red blue green sitting standing "
         "flying man woman car road snow beach field two small large white black sled boat").split()


def tiny_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over a few dozen words."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def tiny_dims(tokenizer, layers: int = 2) -> dict:
    return dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=64)


VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=16)


def save_tiny_git(folder: Path, layers: int = 2) -> Path:
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    config = GitConfig(vision_config=VISION, **tiny_dims(tokenizer, layers), bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    text = dict(**tiny_dims(tokenizer), bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config=VISION, projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"git": save_tiny_git(root / "git"), "blip": save_tiny_blip(root / "blip")}


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    """Five tiny images of mixed modes and sizes, two with a manifest caption, plus one missing file."""
    rng = np.random.default_rng(0)
    images = {
        "rgb": Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
        "gray": Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L"),
        "rgba": Image.fromarray(rng.integers(0, 255, (16, 24, 4), dtype=np.uint8), mode="RGBA"),
        "palette": Image.new("RGB", (33, 17), (10, 200, 30)).convert("P"),
        "big": Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)),
    }
    out = []
    for i, (name, image) in enumerate(images.items()):
        image.save(tmp_path / f"{name}.png")
        out.append({"image_id": name, "path": str(tmp_path / f"{name}.png"), "label": i % 2, "class_name": "x",
                    "split": "train", "holdout": True, "caption": "a dog on the grass" if i < 2 else None})
    out.append({"image_id": "missing", "path": str(tmp_path / "missing.png"), "label": 0, "class_name": "x",
                "split": "train", "holdout": True, "caption": "old caption"})
    return out


def check_captioned(result, rows, backend: str) -> None:
    assert [r["image_id"] for r in result.rows] == [r["image_id"] for r in rows[:5]]
    for row, before in zip(result.rows, rows):
        assert isinstance(row["caption"], str) and row["caption"] == row["caption"].strip()
        assert row["caption_backend"] == backend
        assert row["caption_original"] == before["caption"]  # None where there was none
        assert {k: v for k, v in row.items() if k in before and k != "caption"} == \
               {k: v for k, v in before.items() if k != "caption"}
    assert result.quarantine == [{"image_id": "missing", "path": rows[5]["path"], "reason": "missing file"}]
    assert result.stats["captioned"] == 5 and result.stats["seconds"] > 0


@pytest.mark.parametrize("num_beams", [1, 2])
def test_git_captions_every_loadable_image(models, rows, num_beams):
    config = CaptionConfig(backend="git", model=str(models["git"]), device="cpu", batch_size=2, max_length=8,
                           num_beams=num_beams)
    captioner = load_captioner(config)
    assert isinstance(captioner, GitCaptioner) and not captioner.model.training
    check_captioned(run_caption(rows, captioner), rows, "git")


@pytest.mark.parametrize("num_beams", [1, 2])
def test_blip_captions_every_loadable_image(models, rows, num_beams):
    config = CaptionConfig(backend="blip", model=str(models["blip"]), device="cpu", batch_size=4, max_length=8,
                           num_beams=num_beams)
    captioner = load_captioner(config)
    assert isinstance(captioner, BlipCaptioner)
    check_captioned(run_caption(rows, captioner), rows, "blip")


def test_metadata_passes_captions_through_and_quarantines_missing_ones(rows):
    captioner = load_captioner(CaptionConfig(backend="metadata", batch_size=4))
    assert isinstance(captioner, MetadataCaptioner) and captioner.identity == "metadata"
    result = run_caption(rows, captioner)
    assert [(r["image_id"], r["caption"]) for r in result.rows] == [
        ("rgb", "a dog on the grass"), ("gray", "a dog on the grass"), ("missing", "old caption")]
    assert all(r["caption_backend"] == "metadata" and "caption_original" not in r for r in result.rows)
    assert [(q["image_id"], q["reason"]) for q in result.quarantine] == [
        (name, "no caption in the manifest") for name in ("rgba", "palette", "big")]


def test_captioner_is_loaded_once_per_config(models):
    config = CaptionConfig(backend="git", model=str(models["git"]), device="cpu", max_length=8)
    first = load_captioner(config)
    assert load_captioner(CaptionConfig(**config.model_dump())) is first
    assert load_captioner(config.model_copy(update={"num_beams": 3})) is not first


def test_identity_follows_the_local_model(models, tmp_path):
    config = CaptionConfig(backend="git", model=str(models["git"]), device="cpu")
    identity = captioner_identity(config)
    assert identity.startswith(f"git:{models['git'].resolve()}@")
    assert load_captioner(config).identity == identity
    other = save_tiny_git(tmp_path / "git", layers=1)
    assert captioner_identity(config.model_copy(update={"model": str(other)})) != identity
    assert captioner_identity(CaptionConfig(backend="blip", model="Salesforce/blip-image-captioning-large")) == \
           "blip:Salesforce/blip-image-captioning-large"


def test_bad_model_and_backend_raise_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"caption\.model=.*nope.*no such folder"):
        load_captioner(CaptionConfig(backend="git", model=str(tmp_path / "nope"), device="cpu"))
    with pytest.raises(ValueError, match=r"caption\.model='no-such-org/no-such-captioner'"):
        load_captioner(CaptionConfig(backend="blip", model="no-such-org/no-such-captioner", device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"caption\.model=.*empty"):
        load_captioner(CaptionConfig(backend="git", model=str(tmp_path / "empty"), device="cpu"))
    with pytest.raises(ValueError, match=r"caption\.backend='clip'"):
        load_captioner(CaptionConfig.model_construct(backend="clip", model="x"))
    with pytest.raises(ValueError, match=r"caption\.dtype='float16'"):
        load_captioner(CaptionConfig(backend="git", model="x/y", device="cpu", dtype="float16"))


def test_shard_task_commits_and_reuses_the_shard(models, rows, tmp_path):
    from tasks.caption import caption_shard_task

    store = StageStore(tmp_path / "work", "caption", "k")
    config = CaptionConfig(backend="git", model=str(models["git"]), device="cpu", batch_size=2, max_length=8)
    marker = caption_shard_task.fn(store, 0, rows, config)
    assert marker["cached"] is False and marker["rows"] == 5 and marker["quarantined"] == 1
    assert caption_shard_task.fn(store, 0, rows, config)["cached"] is True
    assert [r["caption_backend"] for r in store.read_shard(0).rows] == ["git"] * 5


@pytest.mark.usefixtures("prefect_server")
def test_phrase_groups_caption_the_rows_no_stage_captioned_with_the_configured_model(models, rows, tmp_path):
    from aspire.config import RetrainConfig
    from tasks.retrain import group_rows

    unlabelled = [{**r, "caption": None} for r in rows]
    config = CaptionConfig(backend="git", model=str(models["git"]), max_length=8)
    store = StageStore(tmp_path / "run", "train", "k")
    spurious = {"x": [["dog"]]}
    grouped, info = group_rows(store, unlabelled, RetrainConfig(), config, spurious, [])
    assert info["captioned_here"] == 5  # the sixth row's file is missing
    assert grouped[5]["group_name"] == "x:uncaptioned"
    assert all(r["group_name"] in ("x:dog", "x:none") for r in grouped[:5])
    marker = store.read_marker("captions")
    again, _ = group_rows(store, unlabelled, RetrainConfig(), config, spurious, [])
    assert again == grouped and store.read_marker("captions") == marker  # committed once, read back
