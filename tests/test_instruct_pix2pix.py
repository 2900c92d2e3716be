"""The InstructPix2Pix background editor on CPU with a tiny random-weight pipeline saved to a folder."""

import os

import numpy as np
import pytest
from tiny_models import tiny_sd_parts, write_clip_tokenizer
from PIL import Image

from aspire.config import BackgroundConfig
from tasks.instruct_pix2pix import (
    FILTERED,
    NO_TEXT,
    InstructPix2PixEditor,
    editor_identity,
    image_seed,
    load_editor,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: a bad hub id fails at once, offline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved StableDiffusionInstructPix2PixPipeline with tiny UNet (8 input channels), VAE and CLIP text model."""
    from diffusers import PNDMScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("ip2p")
    unet, vae, text_encoder = tiny_sd_parts(unet_in_channels=8)
    write_clip_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok", model_max_length=77)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def config(model, **kwargs) -> BackgroundConfig:
    return BackgroundConfig(model=str(model), steps=2, resolution=32, device="cpu", safety_checker=False, **kwargs)


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(40, 30), (61, 90), (32, 32)]]


ROWS = [{"image_id": "a"}, {"image_id": "b"}, {"image_id": "c"}]


def test_edits_keep_sizes_and_are_deterministic(tiny_model):
    editor = load_editor(config(tiny_model, batch_size=2))
    assert load_editor(config(tiny_model, batch_size=2)) is editor
    assert editor.identity.startswith(f"instruct-pix2pix:{tiny_model.resolve()}@")
    images = pictures()
    out = editor.edit(images, ["water", "grass", "sky"], ["land", "snow", "sea"], ROWS)
    assert [im.size for im in out] == [im.size for im in images]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in out)
    again = editor.edit(images, ["water", "grass", "sky"], ["land", "snow", "sea"], ROWS)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(out, again))
    # the same image alone (another batch) gets the same noise: nearly the same edit
    alone = editor.edit(images[1:2], ["grass"], ["snow"], ROWS[1:2])[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(out[1], dtype=int)).max() <= 2
    other_seed = load_editor(config(tiny_model, batch_size=2, seed=1)).edit(images[:1], ["water"], ["land"], ROWS[:1])
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(out[0]))


def test_missing_texts_and_safety_checker_give_reasons(tiny_model):
    editor = load_editor(config(tiny_model))
    out = editor.edit(pictures(), ["water", "", "sky"], ["land", "snow", "  "], ROWS)
    assert isinstance(out[0], Image.Image) and out[1:] == [NO_TEXT, NO_TEXT]
    flagging = InstructPix2PixEditor(config(tiny_model))  # not the shared one: its pipeline is patched
    flagging.pipe.run_safety_checker = lambda image, device, dtype: (image, [True] * len(image))
    assert flagging.edit(pictures()[:2], ["water"] * 2, ["land"] * 2, ROWS[:2]) == [FILTERED, FILTERED]


def test_prompt_and_seed(tiny_model):
    editor = load_editor(config(tiny_model))
    seen = []
    original = editor.pipe

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    editor.pipe = spy
    try:
        editor.edit(pictures()[:1], ["water"], ["land"], ROWS[:1])
    finally:
        editor.pipe = original
    call = seen[0]
    assert call["prompt"] == ["turn the background from water to land"]
    assert (call["guidance_scale"], call["image_guidance_scale"], call["num_inference_steps"]) == (7.5, 1.5, 2)
    assert image_seed(0, "a") == image_seed(0, "a") != image_seed(0, "b")


def test_scheduler_override_by_name(tiny_model):
    editor = load_editor(config(tiny_model, scheduler="EulerAncestralDiscreteScheduler"))
    assert type(editor.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert [im.size for im in editor.edit(pictures(), ["a"] * 3, ["b"] * 3, ROWS)] == [im.size for im in pictures()]
    with pytest.raises(ValueError, match="background.scheduler='NoSuchScheduler'"):
        load_editor(config(tiny_model, scheduler="NoSuchScheduler"))
    with pytest.raises(ValueError, match="background.scheduler='UNet2DConditionModel'"):
        load_editor(config(tiny_model, scheduler="UNet2DConditionModel"))


def test_bad_configs_name_the_key(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="background.dtype"):
        load_editor(config(tiny_model, dtype="float16"))
    with pytest.raises(ValueError, match="background.resolution"):
        load_editor(config(tiny_model).model_copy(update={"resolution": 36}))
    with pytest.raises(ValueError, match="background.model"):
        load_editor(config(tmp_path / "missing"))
    with pytest.raises(ValueError, match="background.model"):
        load_editor(config(tmp_path))  # a folder, but no pipeline in it
    with pytest.raises(ValueError, match="background.backend"):
        load_editor(config(tiny_model, backend="composite"))


def test_identity_follows_the_prompt_and_weights(tiny_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("make the background {alt} instead of {background}")
    assert editor_identity(config(tiny_model)) != editor_identity(config(tiny_model, prompt=str(prompt)))
    assert editor_identity(BackgroundConfig()).startswith("instruct-pix2pix:timbrooks/instruct-pix2pix:prompt=")
