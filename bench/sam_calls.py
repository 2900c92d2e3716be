"""Image-encoder calls and throughput of the SAM segmenters: one embedding per image vs one per box.

Usage: .venv/bin/python bench/sam_calls.py [--images 20] [--max-boxes 5] [--size 64] [--depth 1] [--device cpu]

Both SAM backends are built tiny with random weights (nothing downloaded) and loaded through
``tasks.segmenters.load_segmenter``: segment-anything from a saved checkpoint under a bench-only registry key,
transformers SAM from a saved folder. Each image gets 1..max-boxes random boxes. The batched segmenters are
compared with the naive loop (the image encoder run again for every box), counted by the same forward hook.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aspire.config import RemoveConfig
from tasks.segmenters import HFSamSegmenter, SamSegmenter, load_segmenter

BENCH_TYPE = "tiny-bench"


def tiny_sam(checkpoint: str | None = None, size: int = 64, dim: int = 32, depth: int = 1):
    """A segment-anything ``Sam`` with a small ViT (registry builder signature: ``checkpoint=``)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=depth, num_heads=2,
                                      mlp_ratio=2, out_chans=dim, qkv_bias=True, use_rel_pos=True, window_size=0,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()


def save_tiny_hf_sam(folder: Path, size: int = 64, dim: int = 32, depth: int = 1) -> Path:
    """A transformers SAM with matching small dimensions, saved with its processor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(hidden_size=dim, output_channels=dim, num_hidden_layers=depth, num_attention_heads=2,
                           image_size=size, patch_size=16, mlp_dim=2 * dim, window_size=0, global_attn_indexes=[],
                           num_pos_feats=dim // 2),
        prompt_encoder_config=dict(hidden_size=dim, image_size=size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=dim, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    SamModel(config).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}, mask_size={"longest_edge": size // 4},
        mask_pad_size={"height": size // 4, "width": size // 4})).save_pretrained(folder)
    return folder


def scenes(n: int, max_boxes: int, seed: int) -> list[tuple[Image.Image, list[list[float]]]]:
    """``n`` noise images of 160..320 px per side, each with 1..max_boxes random boxes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        width, height = (int(v) for v in rng.integers(160, 321, 2))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        boxes = []
        for _ in range(int(rng.integers(1, max_boxes + 1))):
            x0, y0 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            boxes.append([x0, y0, rng.uniform(x0 + 10, width), rng.uniform(y0 + 10, height)])
        out.append((image, boxes))
    return out


def naive_sam(segmenter: SamSegmenter, image: Image.Image, boxes: list[list[float]]) -> None:
    """The per-box loop the batched segmenter replaces: ``set_image`` + ``predict`` for every box."""
    rgb = np.asarray(image)
    for box in boxes:
        segmenter.predictor.set_image(rgb)
        segmenter.predictor.predict(box=np.asarray(box), multimask_output=False)


def naive_hf(segmenter: HFSamSegmenter, image: Image.Image, boxes: list[list[float]]) -> None:
    """The per-box loop: the whole model (vision encoder included) once per box."""
    for box in boxes:
        inputs = segmenter.processor(images=image, input_boxes=[[box]], return_tensors="pt").to(segmenter.device)
        with torch.inference_mode():
            out = segmenter.model(**inputs, multimask_output=False)
        segmenter.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())


def timed(segmenter, data, run) -> tuple[int, float]:
    """Encoder calls and images/second of ``run(image, boxes)`` over ``data`` (after one warm-up image)."""
    run(*data[0])
    start_calls, start = segmenter.encoder_calls, time.perf_counter()
    for image, boxes in data:
        run(image, boxes)
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize()
    return segmenter.encoder_calls - start_calls, len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--max-boxes", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="Encoder input size (multiple of 16).")
    parser.add_argument("--depth", type=int, default=1, help="ViT blocks of the tiny encoders.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from segment_anything import sam_model_registry

    torch.manual_seed(args.seed)
    build = partial(tiny_sam, size=args.size, depth=args.depth)
    sam_model_registry[BENCH_TYPE] = build
    folder = Path(tempfile.mkdtemp(prefix="aspire-sam-bench-"))
    torch.save(build().state_dict(), folder / "sam_tiny.pth")
    sam = load_segmenter(RemoveConfig.model_construct(segment="sam", sam_checkpoint=folder / "sam_tiny.pth",
                                                      sam_model_type=BENCH_TYPE, device=args.device))
    hf = load_segmenter(RemoveConfig(segment="hf-sam", device=args.device,
                                     hf_sam_model=str(save_tiny_hf_sam(folder / "hf", args.size, depth=args.depth))))
    data = scenes(args.images, args.max_boxes, args.seed)
    objects = sum(len(boxes) for _, boxes in data)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, device {args.device}, "
          f"torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}")
    print(f"encoders: {args.size} px input, {args.depth} ViT block(s), random weights")
    print(f"images: {len(data)}, objects (boxes): {objects}")
    print(f"{'segmenter':<10} {'mode':<18} {'encoder calls':>13} {'images/s':>9}")
    runs = [("sam", sam, "batched (ours)", sam.segment), ("sam", sam, "naive per box", partial(naive_sam, sam)),
            ("hf-sam", hf, "batched (ours)", hf.segment), ("hf-sam", hf, "naive per box", partial(naive_hf, hf))]
    for name, segmenter, mode, run in runs:
        calls, rate = timed(segmenter, data, run)
        print(f"{name:<10} {mode:<18} {calls:>13} {rate:>9.1f}")


if __name__ == "__main__":
    main()
