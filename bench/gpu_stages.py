"""Every real backend at full size with random weights: images/s through the project's own code against the bare
model call at the same batch size and dtype.

Usage: PYTHONPATH=tests .venv/bin/python -m bench.gpu_stages [--size full|tiny] [--device cuda] [--images 16]
    [--stages classifier,caption,...] [--out DIR]

Per stage, the model is built from its config with random weights (nothing is downloaded), saved as users' models
are (``save_pretrained``, a state dict, a TorchScript file), and loaded by the stage's backend class exactly as a
run loads it. Then, after one warm-up batch each:

- ``project``: the backend's own entry point on PIL images (preprocessing, batching, locks, postprocessing);
- ``pure``: the model call alone on inputs prepared beforehand on the device (``model(x)``, ``model.generate``,
  the image encoder, the diffusers pipeline call), same batch size and dtype.

| stage | full size (``--size full``) | tiny (CPU test) |
|---|---|---|
| classifier | ResNet-50, 224 px, float32 | small CNN, 32 px |
| caption | GIT-large-coco shapes (ViT-L/14 at 420 px, 6-layer 768 decoder), float16 on CUDA | 2-layer GIT |
| ground | Grounding DINO Swin-T + BERT-base (transformers defaults), 800 px | ResNet-tiny DINO, 128 px |
| segment | SAM ViT-H, 1024 px (pure: the image encoder) | one-block ViT, 64 px |
| inpaint | LaMa-sized TorchScript FFC-ResNet (big-lama's widths: 64-512 channels, 3 downsamplings, 18 FFC blocks, 75% global; 51 M parameters like big-lama), 512 px | 8 channels, 1 block |
| background | InstructPix2Pix with SD 1.5 UNet/VAE/CLIP-L shapes, 512 px, float16 on CUDA, ``--steps`` | tiny SD, 32 px |
| generate | Stable Diffusion 1.5 shapes + one learned token, 512 px, float16 on CUDA, ``--steps`` | tiny SD, 32 px |

Results: ``<out>/gpu_stages.json`` and a markdown table on stdout (BENCHMARKS.md "GPU stages"). Target on a GPU:
project >= 50% of pure for every stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

STAGES = ("classifier", "caption", "ground", "segment", "inpaint", "background", "generate")


@dataclass
class Setting:
    size: str  # "full" or "tiny"
    device: str
    images: int
    batch: int
    steps: int

    @property
    def half(self) -> bool:
        return self.device.startswith("cuda")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_second(run: Callable[[], object], n_images: int, device: str) -> float:
    """``run()`` once to warm up, then timed; ``n_images`` are what one timed ``run()`` processes."""
    run()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return n_images / (time.perf_counter() - start)


def pictures(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def bert_vocab(folder: Path, size: int) -> Path:
    """A BERT vocab of ``size`` entries: the special tokens, a few words, then filler pieces."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "dog", "sled", "snow", "photo", "of"]
    words += [f"w{i}" for i in range(max(0, size - len(words)))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder / "vocab.txt"


# -- classifier ----------------------------------------------------------------------------------------------


def bench_classifier(folder: Path, s: Setting) -> dict:
    from aspire.classifier import build_model, save_model, to_tensor
    from aspire.config import ClassifierConfig
    from tasks.classifier import run_predict

    arch, side = ("resnet50", 224) if s.size == "full" else ("small-cnn", 32)
    config = ClassifierConfig(arch=arch, image_size=side, batch_size=s.batch, device=s.device)
    torch.manual_seed(0)
    model = build_model(config, num_classes=2)
    save_model(model, folder / "model.pt", config, ["a", "b"])
    rows = []
    for i, image in enumerate(pictures(s.images, side + 32)):
        image.save(folder / f"{i}.png")
        rows.append({"image_id": str(i), "path": str(folder / f"{i}.png"), "label": 0})
    project = images_per_second(lambda: run_predict(rows, folder / "model.pt", "bench"), s.images, s.device)
    model = model.to(s.device).eval()
    batch = torch.stack([to_tensor(im, side) for im in pictures(s.batch, side)]).to(s.device)

    def pure() -> None:
        with torch.inference_mode():
            for _ in range(0, s.images, s.batch):
                model(batch)

    return {"model": f"{arch} {side} px", "dtype": "float32", "project": project,
            "pure": images_per_second(pure, s.images, s.device)}


# -- caption -------------------------------------------------------------------------------------------------


def bench_caption(folder: Path, s: Setting) -> dict:
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    from aspire.config import CaptionConfig
    from tasks.caption import GitCaptioner

    if s.size == "full":  # microsoft/git-large-coco's shapes
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=420, patch_size=14)
        text = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                    max_position_embeddings=1024)
        vocab, side = 30522, 420
    else:
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=16)
        text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=64)
        vocab, side = 40, 32
    tokenizer = BertTokenizer(str(bert_vocab(folder / "tokenizer", vocab)))
    config = GitConfig(vision_config=vision, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, **text)
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(folder / "git")
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    GitProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder / "git")
    dtype = "float16" if s.half else "float32"
    captioner = GitCaptioner(CaptionConfig(backend="git", model=str(folder / "git"), batch_size=s.batch, dtype=dtype,
                                           device=s.device, max_length=20, num_beams=1))
    images = pictures(s.images, side + 60)

    def project() -> None:
        for i in range(0, s.images, s.batch):
            captioner.caption(images[i : i + s.batch])

    pixel_values = captioner.processor(images=images[: s.batch], return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(s.device, getattr(torch, dtype))

    def pure() -> None:
        with torch.inference_mode():
            for _ in range(0, s.images, s.batch):
                captioner.model.generate(pixel_values=pixel_values, max_length=20, num_beams=1)

    return {"model": "GIT-large-coco shapes" if s.size == "full" else "tiny GIT", "dtype": dtype,
            "project": images_per_second(project, s.images, s.device),
            "pure": images_per_second(pure, s.images, s.device)}


# -- ground --------------------------------------------------------------------------------------------------


def bench_ground(folder: Path, s: Setting) -> dict:
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, ResNetConfig)

    from aspire.config import RemoveConfig
    from tasks.grounders import HFGroundingDino

    if s.size == "full":  # IDEA-Research/grounding-dino-tiny: Swin-T backbone, BERT-base text encoder
        tokenizer = BertTokenizerFast(str(bert_vocab(folder / "vocab", 30522)))
        config = GroundingDinoConfig(text_config=BertConfig(vocab_size=tokenizer.vocab_size))
        processor = GroundingDinoImageProcessor()  # shorter side 800, longer at most 1333
        side, label = 800, "Grounding DINO Swin-T + BERT-base, 800 px"
    else:
        tokenizer = BertTokenizerFast(str(bert_vocab(folder / "vocab", 40)))
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                out_features=["stage2", "stage3", "stage4"])
        text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16, max_position_embeddings=64)
        config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                     decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12,
                                     encoder_n_points=2, decoder_n_points=2, max_text_len=32)
        processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
        side, label = 128, "tiny Grounding DINO, 128 px"
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder / "gdino")
    GroundingDinoProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder / "gdino")
    grounder = HFGroundingDino(RemoveConfig(ground="hf-grounding-dino", ground_model=str(folder / "gdino"),
                                            grounding="joint", device=s.device))
    images = pictures(s.images, side)
    phrases = ["dog", "sled", "snow"]

    def project() -> None:
        for image in images:
            grounder.ground(image, phrases, {})

    inputs = grounder.processor(images=images[0], text="dog. sled. snow.", return_tensors="pt").to(s.device)

    def pure() -> None:
        with torch.inference_mode():
            for _ in images:
                grounder.model(**inputs)

    return {"model": label, "dtype": "float32", "batch": 1, "project": images_per_second(project, s.images, s.device),
            "pure": images_per_second(pure, s.images, s.device)}


# -- segment -------------------------------------------------------------------------------------------------


def tiny_sam():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size, dim = 64, 32
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=0, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)))


def bench_segment(folder: Path, s: Setting) -> dict:
    from segment_anything import sam_model_registry

    from aspire.config import RemoveConfig
    from tasks.segmenters import SamSegmenter

    if s.size == "full":
        kind, side, label = "vit_h", 1024, "SAM ViT-H, 1024 px"
    else:
        kind, side, label = "bench_tiny", 64, "tiny SAM, 64 px"
        sam_model_registry.setdefault(kind, lambda checkpoint=None: tiny_sam())
    torch.manual_seed(0)
    torch.save(sam_model_registry[kind](checkpoint=None).state_dict(), folder / "sam.pth")
    config = RemoveConfig.model_construct(**{**RemoveConfig().model_dump(), "segment": "sam",
                                             "sam_checkpoint": folder / "sam.pth", "sam_model_type": kind,
                                             "device": s.device})
    segmenter = SamSegmenter(config)
    images = pictures(s.images, side)
    boxes = [[side // 8, side // 8, side // 2, side // 2], [side // 3, side // 4, side - 4, side - 8]]

    def project() -> None:
        for image in images:
            segmenter.segment(image, boxes)

    x = segmenter.model.preprocess(torch.rand(1, 3, side, side, device=s.device) * 255)

    def pure() -> None:
        with torch.inference_mode():
            for _ in images:
                segmenter.model.image_encoder(x)

    return {"model": label, "dtype": "float32", "batch": 1, "project": images_per_second(project, s.images, s.device),
            "pure (image encoder)": images_per_second(pure, s.images, s.device)}


# -- inpaint -------------------------------------------------------------------------------------------------


class FFC(torch.nn.Module):
    """LaMa's fast Fourier convolution: channels split 25% local / 75% global; local-to-local, local-to-global and
    global-to-local are 3x3 convs, global-to-global is a spectral transform (1x1 convs around a 1x1 conv on the
    real and imaginary parts of the 2-D FFT)."""

    def __init__(self, channels: int, ratio: float = 0.75) -> None:
        super().__init__()
        glob = int(channels * ratio)
        self.local_channels = channels - glob
        local = self.local_channels
        self.l2l = torch.nn.Conv2d(local, local, 3, padding=1)
        self.l2g = torch.nn.Conv2d(local, glob, 3, padding=1)
        self.g2l = torch.nn.Conv2d(glob, local, 3, padding=1)
        self.reduce = torch.nn.Conv2d(glob, glob // 2, 1)
        self.fourier = torch.nn.Conv2d(glob, glob, 1)  # on (real, imag) of glob // 2 channels
        self.expand = torch.nn.Conv2d(glob // 2, glob, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, glob = x[:, : self.local_channels], x[:, self.local_channels :]
        h, w = glob.shape[-2], glob.shape[-1]
        z = torch.relu(self.reduce(glob))
        spectrum = torch.fft.rfft2(z, norm="ortho")
        f = torch.relu(self.fourier(torch.cat([spectrum.real, spectrum.imag], dim=1)))
        real, imag = torch.chunk(f, 2, dim=1)
        spectral = self.expand(z + torch.fft.irfft2(torch.complex(real, imag), s=[h, w], norm="ortho"))
        return torch.cat([self.l2l(local) + self.g2l(glob), self.l2g(local) + spectral], dim=1)


class SpectralBlock(torch.nn.Module):
    """LaMa's residual block: two FFCs with batch norm and ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(FFC(channels), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
                                        FFC(channels), torch.nn.BatchNorm2d(channels), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LamaSized(torch.nn.Module):
    """(image [B,3,H,W] 0..1, mask [B,1,H,W]) -> [B,3,H,W]: an FFC-ResNet with big-lama's widths (not its weights
    or exact modules): 7x7 stem, ``downs`` stride-2 convs doubling from ``width``, ``blocks`` spectral blocks, and
    transposed convs back up."""

    def __init__(self, width: int = 64, downs: int = 3, blocks: int = 18) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(4, width, 7, padding=3), torch.nn.ReLU()]
        for i in range(downs):
            layers += [torch.nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 3, stride=2, padding=1), torch.nn.ReLU()]
        layers += [SpectralBlock(width * 2**downs) for _ in range(blocks)]
        for i in reversed(range(downs)):
            layers += [torch.nn.ConvTranspose2d(width * 2 ** (i + 1), width * 2**i, 3, stride=2, padding=1,
                                                output_padding=1), torch.nn.ReLU()]
        layers += [torch.nn.Conv2d(width, 3, 7, padding=3), torch.nn.Sigmoid()]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image * (1 - mask), mask], dim=1))


def bench_inpaint(folder: Path, s: Setting) -> dict:
    from aspire.config import RemoveConfig
    from tasks.inpainters import LamaInpainter

    model, side = (LamaSized(), 512) if s.size == "full" else (LamaSized(width=8, downs=1, blocks=1), 32)
    torch.jit.script(model.eval()).save(str(folder / "big-lama.pt"))
    os.environ["LAMA_MODEL"] = str(folder / "big-lama.pt")
    inpainter = LamaInpainter(RemoveConfig(inpaint="lama", batch_size=s.batch, device=s.device))
    images = pictures(s.images, side)
    masks = [np.zeros((side, side), dtype=bool) for _ in images]
    for mask in masks:
        mask[side // 4 : side // 2, side // 4 : side // 2] = True

    def project() -> None:
        inpainter.inpaint(images, masks)

    image = torch.rand(s.batch, 3, side, side, device=s.device)
    hole = torch.zeros(s.batch, 1, side, side, device=s.device)
    hole[..., side // 4 : side // 2, side // 4 : side // 2] = 1

    def pure() -> None:
        with torch.inference_mode():
            for _ in range(0, s.images, s.batch):
                inpainter.model(image, hole)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"model": f"LaMa-sized FFC-ResNet ({params:.0f} M parameters), {side} px", "dtype": "float32",
            "project": images_per_second(project, s.images, s.device),
            "pure": images_per_second(pure, s.images, s.device)}


# -- background and generate (Stable Diffusion 1.5 shapes) --------------------------------------------------


def sd_parts(size: str, unet_in_channels: int):
    """(unet, vae, text_encoder, tokenizer folder writer, resolution) at SD 1.5's shapes or tiny ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import tiny_sd_parts
    from transformers import CLIPTextConfig, CLIPTextModel

    if size != "full":
        return (*tiny_sd_parts(unet_in_channels=unet_in_channels), 32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=unet_in_channels, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return unet, vae, text, 512


def save_sd(folder: Path, size: str, pipeline_class, unet_in_channels: int) -> int:
    from diffusers import PNDMScheduler
    from tiny_models import write_clip_tokenizer
    from transformers import CLIPTokenizer

    unet, vae, text, side = sd_parts(size, unet_in_channels)
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77)
    pipe = pipeline_class(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                          scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return side


def bench_background(folder: Path, s: Setting) -> dict:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from aspire.config import BackgroundConfig
    from tasks.instruct_pix2pix import InstructPix2PixEditor

    side = save_sd(folder, s.size, StableDiffusionInstructPix2PixPipeline, unet_in_channels=8)
    dtype = "float16" if s.half else "float32"
    editor = InstructPix2PixEditor(BackgroundConfig(model=str(folder / "model"), steps=s.steps, resolution=side,
                                                    batch_size=s.batch, dtype=dtype, safety_checker=False,
                                                    device=s.device))
    images = pictures(s.images, side)
    rows = [{"image_id": str(i)} for i in range(s.images)]

    def project() -> None:
        editor.edit(images, ["snow"] * s.images, ["beach"] * s.images, rows)

    prompts = ["turn the snow into a beach"] * s.batch

    def pure() -> None:
        for i in range(0, s.images, s.batch):
            editor.pipe(prompt=prompts, image=images[i : i + s.batch], num_inference_steps=s.steps,
                        guidance_scale=7.5, image_guidance_scale=1.5, output_type="pil")

    return {"model": f"InstructPix2Pix, SD 1.5 shapes, {side} px, {s.steps} steps" if s.size == "full"
            else f"tiny InstructPix2Pix, {side} px", "dtype": dtype,
            "project": images_per_second(project, s.images, s.device),
            "pure": images_per_second(pure, s.images, s.device)}


def bench_generate(folder: Path, s: Setting) -> dict:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from aspire.config import GenerateConfig
    from tasks.generate_sd import SDGenerator

    side = save_sd(folder, s.size, StableDiffusionPipeline, unet_in_channels=4)
    generator = SDGenerator(GenerateConfig(steps=s.steps, resolution=side, batch_size=s.batch, safety_checker=False,
                                           device=s.device), str(folder / "model"))
    hidden = generator.pipe.text_encoder.config.hidden_size
    save_file({"<dog>": torch.randn(hidden)}, folder / "dog.safetensors")
    generator.load_token(folder / "dog.safetensors", "<dog>")
    seeds = list(range(s.images))

    def project() -> None:
        generator.generate("dog", "<dog>", seeds)

    def pure() -> None:
        for _ in range(0, s.images, s.batch):
            generator.pipe(prompt=["a photo of a <dog>"] * s.batch, num_inference_steps=s.steps, guidance_scale=7.5,
                           height=side, width=side, output_type="pil")

    return {"model": f"Stable Diffusion 1.5 shapes, {side} px, {s.steps} steps" if s.size == "full"
            else f"tiny Stable Diffusion, {side} px", "dtype": str(generator.dtype).replace("torch.", ""),
            "project": images_per_second(project, s.images, s.device),
            "pure": images_per_second(pure, s.images, s.device)}


BENCHES = {"classifier": bench_classifier, "caption": bench_caption, "ground": bench_ground,
           "segment": bench_segment, "inpaint": bench_inpaint, "background": bench_background,
           "generate": bench_generate}


def peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory (Linux ``VmHWM``); ``reset`` starts a new peak from now."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(stages: list[str], setting: Setting, out: Path | None = None) -> list[dict]:
    """Each stage in its own temporary folder; a stage that fails is reported with its error, the others go on.
    ``peak_rss_mb``: the process's peak resident memory while the stage built, loaded and ran its model."""
    results = []
    for name in stages:
        with tempfile.TemporaryDirectory(prefix=f"gpu-stages-{name}-") as tmp:
            gc.collect()
            peak_rss_mb(reset=True)
            start = time.perf_counter()
            try:
                result = BENCHES[name](Path(tmp), setting)
            except Exception as exc:  # a bench row, not a crash: one stage's failure must not hide the others
                result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            pure = next((v for k, v in result.items() if k.startswith("pure")), None)
            result = {"stage": name, "batch": setting.batch, **result,
                      "project_share": round(result["project"] / pure, 3) if pure else None,
                      "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb() or 0)}
            if setting.device.startswith("cuda"):
                result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
                torch.cuda.reset_peak_memory_stats()
            results.append(result)
            print(json.dumps(result), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        machine = torch.cuda.get_device_name() if setting.device.startswith("cuda") else platform.processor() or "cpu"
        (out / "gpu_stages.json").write_text(json.dumps({"machine": machine, "setting": setting.__dict__,
                                                          "results": results}, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=Path("data/runs/gpu_stages"))
    args = parser.parse_args()
    setting = Setting(args.size, args.device, args.images, args.batch, args.steps)
    results = run(args.stages.split(","), setting, args.out)
    print("| stage | model | dtype | batch | project images/s | pure images/s | project / pure | peak RSS MB "
          "| peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['stage']} | **failed**: {r['error']} | | | | | | | |")
            continue
        pure = next(v for k, v in r.items() if k.startswith("pure"))
        print(f"| {r['stage']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['project']:.2f} | {pure:.2f} "
              f"| {r['project_share']:.2f} | {r['peak_rss_mb']} | {r.get('peak_gpu_mb', '-')} |")


if __name__ == "__main__":
    main()
