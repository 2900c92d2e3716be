"""Pieces shared by the tests that build tiny diffusers/transformers models from configs."""

from __future__ import annotations

import json
import string
from pathlib import Path


def write_clip_tokenizer(folder: Path, merges: tuple[str, ...] = ()) -> Path:
    """A CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``) over single characters, plus the tokens the given
    BPE ``merges`` make ("c a" -> "ca"): every lowercase word splits into known pieces.

    Load it with ``CLIPTokenizer.from_pretrained(folder, model_max_length=77)``."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase + string.digits)
    pieces += [c + "</w>" for c in string.ascii_lowercase + string.digits]
    pieces += ["".join(m.split()) for m in merges]
    (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return folder


TEXT_HIDDEN = 16  # width of the tiny CLIP text encoder = size of a learned token embedding


def tiny_sd_parts(unet_in_channels: int = 4, vocab_size: int = 80):
    """(unet, vae, text_encoder) of a tiny Stable Diffusion, random weights seeded with 0.

    ``unet_in_channels``: 4 for text-to-image, 8 for InstructPix2Pix (image latents concatenated)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)  # test fixture only: random weights, fixed so that runs are comparable
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16,
                                in_channels=unet_in_channels, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_HIDDEN,
                                                intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                                vocab_size=vocab_size, max_position_embeddings=77))
    return unet, vae, text_encoder


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random-weight ``CLIPModel`` and its ``CLIPProcessor`` (32 px images) saved into ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_clip_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok", model_max_length=77)
    torch.manual_seed(0)  # test fixture only: fixed random weights
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_HIDDEN, intermediate_size=32,
                num_attention_heads=2, num_hidden_layers=2, vocab_size=80, max_position_embeddings=77)
    clip = CLIPModel(CLIPConfig(text_config=text, projection_dim=8,
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                   num_hidden_layers=2, image_size=32, patch_size=8)))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    clip.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def draw_splits(folder: Path, **synth: object) -> dict[str, list[dict]]:
    """A synthetic benchmark (``aspire.synth.SynthConfig(**synth)``) drawn into ``folder``, rows by split."""
    from aspire.synth import SynthConfig, draw_benchmark

    rows = draw_benchmark(SynthConfig(**synth), folder)
    return {split: [row for row in rows if row["split"] == split] for split in ("train", "val", "test")}
