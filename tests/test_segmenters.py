"""Segmenters of the remove stage on CPU: box, GrabCut, and tiny random-weight SAMs built from configs."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import RemoveConfig
from tasks.segmenters import (
    BoxSegmenter,
    GrabCutSegmenter,
    HFSamSegmenter,
    SamSegmenter,
    load_segmenter,
    segmenter_identity,
)

BOXES = [[4.0, 6.0, 40.0, 30.0], [30.5, 10.2, 70.8, 45.9], [0.0, 0.0, 79.0, 49.0]]  # in an 80 x 50 image
TINY = "tiny-test"  # registry key of the test-only segment-anything builder


def noise_image(width: int = 80, height: int = 50, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def disc_scene(size: int = 96, radius: int = 20) -> tuple[Image.Image, np.ndarray]:
    """A red disc on a green/blue checkered, noisy background; returns the image and the disc's mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    checker = ((yy // 6 + xx // 6) % 2).astype(bool)
    pixels = np.where(checker[..., None], [40, 160, 60], [50, 90, 170]).astype(np.int16)
    pixels += rng.integers(-25, 26, pixels.shape, dtype=np.int16)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2
    pixels[disc] = [220, 30, 30] + rng.integers(-20, 21, (int(disc.sum()), 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), disc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ------------------------------------------------------------------------------------------ box and grabcut


def test_box_segmenter_masks_are_the_clipped_boxes() -> None:
    image = noise_image()
    masks = BoxSegmenter().segment(image, BOXES)
    assert [m.shape for m in masks] == [(50, 80)] * 3 and all(m.dtype == bool for m in masks)
    assert masks[0].sum() == 36 * 24 and masks[0][6:30, 4:40].all()
    assert BoxSegmenter().segment(image, []) == []


def test_grabcut_recovers_the_disc_inside_the_box_deterministically() -> None:
    image, disc = disc_scene()
    box = [24.0, 24.0, 73.0, 73.0]
    segmenter = GrabCutSegmenter()
    first = segmenter.segment(image, [box])[0]
    assert first.shape == (96, 96) and first.dtype == bool
    assert iou(first, disc) > 0.6, iou(first, disc)
    assert not first[~BoxSegmenter().segment(image, [box])[0]].any()  # nothing outside the box
    assert np.array_equal(first, segmenter.segment(image, [box])[0])
    assert np.array_equal(first, GrabCutSegmenter().segment(image, [box])[0])


def star_on_checkerboard(seed: int, cell: int, size: int = 64) -> tuple[Image.Image, np.ndarray, list[float]]:
    """A flat grey-brown star on a noisy cream/brown checkerboard (suite draw d05's piano in its ballroom): the
    image, the star's mask and its box."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    checker = ((yy // cell + xx // cell) % 2).astype(bool)
    pixels = np.where(checker[..., None], [230, 210, 160], [90, 60, 40]) + rng.integers(-10, 11, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    angles = np.pi * np.arange(10) / 5 - np.pi / 2 + rng.uniform(0, np.pi / 5)
    radii = np.where(np.arange(10) % 2 == 0, size / 4, size / 9)
    points = [(size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)) for r, a in zip(radii, angles)]
    ImageDraw.Draw(image).polygon(points, fill=(120, 110, 100))
    star = Image.new("L", image.size, 0)
    ImageDraw.Draw(star).polygon(points, fill=255)
    xs, ys = zip(*points)
    return image, np.asarray(star) > 0, [min(xs) - 1, min(ys) - 1, max(xs) + 1, max(ys) + 1]


def test_grabcut_keeps_a_checkerboard_out_of_a_flat_object() -> None:
    # started from the whole box, GrabCut's foreground model learns the checkerboard too and keeps about half the
    # box (IoU ~0.57 on these scenes); started from what differs from the ring around the box, it keeps the star
    scores = []
    for seed in range(4):
        for cell in (3, 4, 6):
            image, star, box = star_on_checkerboard(seed, cell)
            scores.append(iou(GrabCutSegmenter().segment(image, [box])[0], star))
    assert np.mean(scores) > 0.75, scores


def test_grabcut_falls_back_to_the_box_when_it_cannot_segment(caplog: pytest.LogCaptureFixture) -> None:
    image, _ = disc_scene()
    tiny, whole = [10.0, 10.0, 12.0, 12.0], [0.0, 0.0, 96.0, 96.0]  # too small; no background pixels left
    with caplog.at_level(logging.INFO, logger="tasks.segmenters"):
        masks = GrabCutSegmenter().segment(image, [tiny, whole])
    assert np.array_equal(masks[0], BoxSegmenter().segment(image, [tiny])[0])
    assert masks[1].all()
    assert "keeping the box mask" in caplog.text and caplog.text.count("grabcut:") == 2
    # nothing in the box differs from its surroundings: no colour prior, plain GrabCut finds nothing, the box stays
    flat, box = Image.new("RGB", (64, 64), (90, 90, 90)), [20.0, 20.0, 40.0, 40.0]
    assert np.array_equal(GrabCutSegmenter().segment(flat, [box])[0], BoxSegmenter().segment(flat, [box])[0])


@pytest.mark.parametrize("box", [[1, 2, 3], [10, 10, 5, 20], [0, 0, float("nan"), 4]])
def test_bad_boxes_are_refused(box: list[float]) -> None:
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        BoxSegmenter().segment(noise_image(), [[0, 0, 4, 4], box])


# ------------------------------------------------------------------------------------- segment-anything


def tiny_sam(checkpoint: str | None = None, size: int = 64, dim: int = 32):
    """A ``Sam`` with a one-block ViT (``size`` px, 16 px patches, ``dim`` channels): a registry builder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=0, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, weights_only=True))
    return sam.eval()


def save_sam_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_sam().state_dict(), path)
    return path


def sam_config(checkpoint: Path | None, model_type: str = TINY) -> RemoveConfig:
    """``RemoveConfig`` accepts only the real model types: the test key goes in through ``model_construct``."""
    return RemoveConfig.model_construct(segment="sam", sam_checkpoint=checkpoint, sam_model_type=model_type,
                                        device="cpu")


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", seed=0)


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, TINY, tiny_sam)


def test_sam_runs_the_encoder_once_per_image_for_all_boxes(sam_checkpoint: Path) -> None:
    segmenter = load_segmenter(sam_config(sam_checkpoint))
    assert isinstance(segmenter, SamSegmenter) and load_segmenter(sam_config(sam_checkpoint)) is segmenter
    start = segmenter.encoder_calls
    masks = segmenter.segment(noise_image(), BOXES)
    assert len(masks) == 3 and all(m.shape == (50, 80) and m.dtype == bool for m in masks)
    assert segmenter.encoder_calls - start == 1
    segmenter.segment(noise_image(60, 90, seed=1), BOXES[:2])
    assert segmenter.segment(noise_image(), []) == []
    assert segmenter.encoder_calls - start == 2


def test_sam_batched_masks_match_one_prompt_at_a_time(sam_checkpoint: Path) -> None:
    segmenter = load_segmenter(sam_config(sam_checkpoint))
    image = noise_image(seed=2)
    batched = segmenter.segment(image, BOXES)
    predictor = segmenter.predictor
    predictor.set_image(np.asarray(image))
    for box, mask in zip(BOXES, batched, strict=True):
        single, _, _ = predictor.predict(box=np.array(box), multimask_output=False)  # (1, H, W)
        assert (single[0] != mask).mean() < 0.01  # batched float math may flip a few threshold pixels


def test_sam_errors_name_the_config_key(tmp_path: Path, sam_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="remove.sam_checkpoint=None"):
        load_segmenter(sam_config(None))
    with pytest.raises(ValueError, match="remove.sam_checkpoint=.*no such file"):
        load_segmenter(sam_config(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="remove.sam_checkpoint=.*not a segment-anything"):
        load_segmenter(sam_config(garbage))
    with pytest.raises(ValueError, match="remove.sam_model_type='vit_x'"):
        SamSegmenter(sam_config(sam_checkpoint, model_type="vit_x"))


def test_sam_identity_follows_the_checkpoint_contents(tmp_path: Path, sam_checkpoint: Path) -> None:
    identity = segmenter_identity(sam_config(sam_checkpoint))
    assert identity.startswith(f"sam:{TINY}:sam_tiny.pth@")
    moved = tmp_path / "elsewhere" / "sam_tiny.pth"
    moved.parent.mkdir()
    moved.write_bytes(sam_checkpoint.read_bytes())
    assert segmenter_identity(sam_config(moved)) == identity
    other = save_sam_checkpoint(tmp_path / "retrained" / "sam_tiny.pth", seed=1)
    assert segmenter_identity(sam_config(other)) != identity
    assert segmenter_identity(RemoveConfig(segment="box")) == "box"
    assert segmenter_identity(RemoveConfig(segment="grabcut")).startswith("grabcut:")


# ---------------------------------------------------------------------------------------- transformers SAM


def save_tiny_hf_sam(folder: Path, size: int = 64, dim: int = 32) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(hidden_size=dim, output_channels=dim, num_hidden_layers=1, num_attention_heads=2,
                           image_size=size, patch_size=16, mlp_dim=64, window_size=0, global_attn_indexes=[0],
                           num_pos_feats=dim // 2),
        prompt_encoder_config=dict(hidden_size=dim, image_size=size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=dim, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(folder)
    image_processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                        mask_size={"longest_edge": size // 4},
                                        mask_pad_size={"height": size // 4, "width": size // 4})
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    return folder


def test_hf_sam_runs_the_encoder_once_per_image_for_all_boxes(tmp_path: Path) -> None:
    config = RemoveConfig(segment="hf-sam", hf_sam_model=str(save_tiny_hf_sam(tmp_path / "sam")), device="cpu")
    segmenter = load_segmenter(config)
    assert isinstance(segmenter, HFSamSegmenter) and segmenter.identity.startswith(f"hf-sam:{tmp_path / 'sam'}@")
    masks = segmenter.segment(noise_image(), BOXES)
    assert len(masks) == 3 and all(m.shape == (50, 80) and m.dtype == bool for m in masks)
    assert segmenter.encoder_calls == 1
    inputs = segmenter.processor(images=noise_image(), input_boxes=[BOXES], return_tensors="pt")
    with torch.inference_mode():  # the same boxes through the whole model, pixel values in
        direct = segmenter.model(**inputs, multimask_output=False).pred_masks
    direct = segmenter.processor.image_processor.post_process_masks(
        direct, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # (3, 1, H, W)
    assert all(np.array_equal(direct[i, 0].numpy(), mask) for i, mask in enumerate(masks))
    segmenter.segment(noise_image(60, 90, seed=1), BOXES[:1])
    assert segmenter.segment(noise_image(), []) == []
    assert segmenter.encoder_calls == 3  # 1 + the direct call above + 1


def test_hf_sam_missing_folder_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="remove.hf_sam_model=.*no such folder"):
        load_segmenter(RemoveConfig(segment="hf-sam", hf_sam_model=str(tmp_path / "none"), device="cpu"))
