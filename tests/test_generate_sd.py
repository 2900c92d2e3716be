"""The Stable Diffusion generator and the CLIP filter on CPU, with tiny random-weight models saved to folders."""

import os

import numpy as np
import pytest
from tiny_models import TEXT_HIDDEN, save_tiny_clip, tiny_sd_parts, write_clip_tokenizer
import torch
from PIL import Image
from safetensors.torch import save_file

from aspire.config import GenerateConfig
from tasks.generate_sd import (
    FILTERED,
    ClipFilter,
    SDGenerator,
    clip_identity,
    generator_identity,
    load_clip_filter,
    load_generator,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: a bad hub id fails at once, offline

HIDDEN = TEXT_HIDDEN  # text encoder width = size of a learned embedding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny StableDiffusionPipeline and CLIP model + processor, and a learned ``<dog>`` embedding."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("sd")
    unet, vae, text_encoder = tiny_sd_parts()
    write_clip_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok", model_max_length=77)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")

    save_tiny_clip(folder / "clip")

    save_file({"<dog>": torch.randn(HIDDEN)}, folder / "dog.safetensors")  # diffusers' learned_embeds format
    save_file({"<dog>": torch.randn(HIDDEN)}, folder / "dog2.safetensors")
    return folder


def config(models, **kwargs) -> GenerateConfig:
    values = dict(steps=2, resolution=32, batch_size=2, device="cpu", safety_checker=False,
                  clip_model=str(models / "clip"))
    return GenerateConfig(**{**values, **kwargs})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def test_seeded_images_do_not_depend_on_the_batch(models):
    generator = load_generator(config(models), str(models / "model"))
    assert load_generator(config(models, seed=7), str(models / "model")) is generator  # seed is not its concern
    generator.load_token(models / "dog.safetensors", "<dog>")
    size = len(generator.pipe.tokenizer)
    generator.load_token(models / "dog.safetensors", "<dog>")  # idempotent
    assert len(generator.pipe.tokenizer) == size

    out = generator.generate("dog", "<dog>", [4, 5, 6])
    assert [seed for seed, _ in out] == [4, 5, 6]
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for _, im in out)
    again = generator.generate("dog", "<dog>", [4, 5, 6])
    assert all(np.array_equal(pixels(a), pixels(b)) for (_, a), (_, b) in zip(out, again))
    # seed 5 alone vs second in a batch [4, 5] (batch_size 2): the same starting noise; exact here (CPU, one
    # thread), but batched kernels (several threads, GPU) may sum in another order: allow a couple of 8-bit levels
    (seed, alone), = generator.generate("dog", "<dog>", [5])
    assert seed == 5 and np.abs(pixels(alone) - pixels(out[1][1])).max() <= 2
    assert not np.array_equal(pixels(out[0][1]), pixels(out[1][1]))
    assert generator.filtered == 0


def test_prompt_and_pipeline_arguments(models):
    generator = load_generator(config(models, guidance=3.0), str(models / "model"))
    seen, original = [], generator.pipe

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    generator.pipe = spy
    try:
        generator.generate("dog", "<dog>", [1, 2, 3])
    finally:
        generator.pipe = original
    assert [len(call["prompt"]) for call in seen] == [2, 1]  # batch_size 2
    assert seen[0]["prompt"] == ["a photo of a <dog>"] * 2
    call = seen[0]
    assert (call["num_inference_steps"], call["guidance_scale"], call["height"], call["width"]) == (2, 3.0, 32, 32)
    assert [g.initial_seed() for call in seen for g in call["generator"]] == [1, 2, 3]


def test_another_embedding_replaces_a_loaded_token(models):
    generator = SDGenerator(config(models), str(models / "model"))  # not the shared one: its token changes
    generator.load_token(models / "dog.safetensors", "<dog>")
    first = generator.generate("dog", "<dog>", [0])[0][1]
    generator.load_token(models / "dog2.safetensors", "<dog>")
    tokenizer, encoder = generator.pipe.tokenizer, generator.pipe.text_encoder
    assert tokenizer.tokenize("<dog>") == ["<dog>"]
    row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<dog>")]
    from safetensors.torch import load_file

    assert torch.allclose(row, load_file(models / "dog2.safetensors")["<dog>"])
    assert not np.array_equal(pixels(first), pixels(generator.generate("dog", "<dog>", [0])[0][1]))


def test_safety_checker(models):
    generator = SDGenerator(config(models, safety_checker=True), str(models / "model"))
    assert generator.pipe.safety_checker is None  # the tiny pipeline has none: it simply runs
    assert all(isinstance(im, Image.Image) for _, im in generator.generate("dog", "dog", [1, 2]))
    assert generator.filtered == 0
    generator.pipe.run_safety_checker = lambda image, device, dtype: (image, [True, False][: len(image)])
    out = generator.generate("dog", "dog", [1, 2, 3])
    assert [im if im == FILTERED else "kept" for _, im in out] == [FILTERED, "kept", FILTERED]
    assert generator.filtered == 2


def test_clip_filter(models):
    clip = load_clip_filter(config(models))
    assert load_clip_filter(config(models, steps=9)) is clip
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in [(32, 32), (48, 40), (20, 64)]]
    scores = clip.scores(images, ["snow", "grass field"])
    assert scores.shape == (3, 2) and scores.dtype == np.float32 and np.all(np.abs(scores) <= 1 + 1e-5)
    assert np.allclose(clip.scores(images[1:2], ["grass field"]), scores[1:2, 1:], atol=1e-5)
    assert clip.scores(images, []).shape == (3, 0)
    assert clip.keep(images, []) == [True] * 3
    assert clip.keep(images, ["", "  "]) == [True] * 3
    assert ClipFilter(config(models, clip_threshold=-1.0)).keep(images, ["snow"]) == [False] * 3
    assert ClipFilter(config(models, clip_threshold=2.0)).keep(images, ["snow", "grass"]) == [True] * 3
    # exactly image 0's best score (scored alone, as keep() scores it): dropped, keep needs < threshold
    threshold = float(clip.scores(images[:1], ["snow", "grass field"]).max())
    assert ClipFilter(config(models, clip_threshold=threshold)).keep(images[:1], ["snow", "grass field"]) == [False]


def test_identities_without_loading(models, tmp_path):
    model = models / "model"
    assert generator_identity(config(models), str(model)).startswith(f"textual-inversion:{model.resolve()}@")
    assert generator_identity(GenerateConfig(), "runwayml/stable-diffusion-v1-5").startswith(
        "textual-inversion:runwayml/stable-diffusion-v1-5:prompt=")
    prompt = tmp_path / "p.txt"
    prompt.write_text("a {token} {class_name} in the wild")
    assert generator_identity(config(models), str(model)) != generator_identity(config(models, prompt=str(prompt)),
                                                                                str(model))
    assert clip_identity(GenerateConfig()) == "clip:openai/clip-vit-base-patch32"
    assert clip_identity(config(models)).startswith(f"clip:{(models / 'clip').resolve()}@")


def test_bad_inputs_name_the_key(models, tmp_path):
    model = str(models / "model")
    with pytest.raises(ValueError, match="personalize.model"):
        load_generator(config(models), str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="personalize.model"):
        load_generator(config(models), str(tmp_path))  # a folder, but no pipeline in it
    with pytest.raises(ValueError, match="generate.resolution=36"):
        load_generator(config(models, resolution=36), model)
    with pytest.raises(ValueError, match="generate.backend"):
        load_generator(config(models, backend="composite"), model)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="generate.device"):
            load_generator(config(models, device="cuda"), model)
    with pytest.raises(ValueError, match="generate.clip_model"):
        load_clip_filter(config(models, clip_model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="generate.clip_model"):
        load_clip_filter(config(models, clip_model=str(tmp_path)))
    generator = load_generator(config(models), model)
    with pytest.raises(ValueError, match="embeds_path"):
        generator.load_token(tmp_path / "missing.safetensors", "<cat>")
    with pytest.raises(ValueError, match="seeds"):
        generator.generate("dog", "<dog>", [1, -2])
