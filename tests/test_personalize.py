"""Textual inversion (ASPIRE step 5) on CPU with a tiny random-weight Stable Diffusion saved to a folder."""

import json
import os

import numpy as np
import pytest
from tiny_models import tiny_sd_parts, write_clip_tokenizer
import torch
from PIL import Image
from safetensors.torch import load_file

from aspire.cache import StageStore
from aspire.config import PersonalizeConfig
from tasks import personalize
from tasks.personalize import (
    CHECKPOINT_FILE,
    EMBEDS_FILE,
    TOKEN_FILE,
    check_initializers,
    initializer_for,
    part_name,
    personalize_class_task,
    personalize_identity,
    placeholder_for,
    select_training_images,
    train_textual_inversion,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: a bad hub id fails at once, offline

# BPE merges that make "cat" and "object" single tokens; every other word splits into characters
MERGES = ["o b", "ob j", "e c", "ec t</w>", "obj ect</w>", "c a", "ca t</w>"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A saved StableDiffusionPipeline (tiny UNet, VAE, CLIP text model, DDPM scheduler) and 4 small PNGs."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("sd")
    write_clip_tokenizer(folder / "tok", tuple(MERGES))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok", model_max_length=77)
    unet, vae, text_encoder = tiny_sd_parts(vocab_size=len(tokenizer))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(40, 30), (30, 45), (32, 32), (50, 36)]):
        images.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])
    return folder / "model", images


def config(model, **kwargs) -> PersonalizeConfig:
    settings = dict(model=str(model), steps=4, checkpoint_every=2, resolution=32, batch_size=1,
                    gradient_accumulation=2, repeats=2, device="cpu")
    return PersonalizeConfig(**{**settings, **kwargs})


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """One uninterrupted 4-step run; the loaded models are captured with a copy of their weights before training."""
    model, images = tiny_sd
    out = tmp_path_factory.mktemp("out")
    seen = {}
    load = personalize.load_models

    def capture(cfg):
        models = load(cfg)
        seen.update(models=models, before={n: state(getattr(models, n)) for n in ("text_encoder", "vae", "unet")})
        return models

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(personalize, "load_models", capture)
        info = train_textual_inversion(images, "<cat>", "cat", config(model), out / "emb", out / "ckpt")
    return info, out, seen


def test_only_the_new_row_changes(trained, tiny_sd):
    info, out, seen = trained
    assert info["resumed_from"] == 0 and info["steps"] == 4 and np.isfinite(info["final_loss"])
    assert json.loads((out / "emb" / TOKEN_FILE).read_text()) == {k: info[k] for k in
                                                                    ("placeholder", "initializer", "images", "steps",
                                                                     "final_loss")}
    models, before = seen["models"], seen["before"]
    for name in ("vae", "unet"):
        after = state(getattr(models, name))
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name
    key = "text_model.embeddings.token_embedding.weight"
    text_after = state(models.text_encoder)
    assert all(torch.equal(text_after[k], v) for k, v in before["text_encoder"].items() if k != key)
    old, new = before["text_encoder"][key], text_after[key]
    assert new.shape[0] == old.shape[0] + 1
    assert torch.equal(new[: old.shape[0]], old)  # every original row bit-identical
    init_row = old[json.loads((tiny_sd[0] / "tokenizer" / "vocab.json").read_text())["cat</w>"]]
    assert not torch.equal(new[-1], init_row)  # the new row moved away from its initializer
    assert (out / "ckpt" / CHECKPOINT_FILE).is_file()


def test_learned_embeds_load_into_a_fresh_pipeline(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    info, out, seen = trained
    learned = load_file(str(out / "emb" / EMBEDS_FILE))
    assert list(learned) == ["<cat>"] and learned["<cat>"].shape == (1, 16)
    trained_row = seen["models"].text_encoder.get_input_embeddings().weight[-1].detach()
    assert torch.equal(learned["<cat>"][0], trained_row)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd[0], safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out / "emb" / EMBEDS_FILE), token="<cat>")
    ids = pipe.tokenizer("<cat>", add_special_tokens=False).input_ids
    assert len(ids) == 1
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids[0]], learned["<cat>"][0])
    image = pipe("a photo of a <cat>", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_embedding(trained, tiny_sd, tmp_path, monkeypatch):
    model, images = tiny_sd
    save = personalize._save_checkpoint

    def save_then_die(folder, checkpoint):
        save(folder, checkpoint)
        if checkpoint["step"] == 2:
            raise Killed

    monkeypatch.setattr(personalize, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_textual_inversion(images, "<cat>", "cat", config(model), tmp_path / "emb", tmp_path / "ckpt")
    assert not (tmp_path / "emb" / EMBEDS_FILE).exists()
    monkeypatch.undo()
    info = train_textual_inversion(images, "<cat>", "cat", config(model), tmp_path / "emb", tmp_path / "ckpt")
    assert info["resumed_from"] == 2
    resumed = load_file(str(tmp_path / "emb" / EMBEDS_FILE))["<cat>"]
    uninterrupted = load_file(str(trained[1] / "emb" / EMBEDS_FILE))["<cat>"]
    assert torch.allclose(resumed, uninterrupted, atol=1e-6, rtol=0)
    assert info["final_loss"] == pytest.approx(trained[0]["final_loss"], abs=1e-6)
    # a finished checkpoint is reused; one of another run (other seed) is not
    again = train_textual_inversion(images, "<cat>", "cat", config(model), tmp_path / "e2", tmp_path / "ckpt")
    assert again["resumed_from"] == 4
    other = train_textual_inversion(images, "<cat>", "cat", config(model, seed=1, steps=2), tmp_path / "e3",
                                    tmp_path / "ckpt")
    assert other["resumed_from"] == 0
    assert not torch.equal(load_file(str(tmp_path / "e3" / EMBEDS_FILE))["<cat>"], resumed)


def test_bad_tokens_and_configs_raise(tiny_sd, tmp_path):
    model, images = tiny_sd
    run = lambda placeholder, init, cfg: train_textual_inversion(images, placeholder, init, cfg, tmp_path / "o",
                                                                 tmp_path / "c")
    with pytest.raises(ValueError, match="personalize.initializer_token='dog'"):
        run("<dog>", "dog", config(model))  # d, o, g</w>: three tokens
    with pytest.raises(ValueError, match="personalize.placeholder='ca'"):
        run("ca", "cat", config(model))  # already in the vocabulary
    with pytest.raises(ValueError, match="personalize.mixed_precision"):
        run("<cat>", "cat", config(model, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="personalize.resolution"):
        run("<cat>", "cat", config(model, resolution=36))
    with pytest.raises(ValueError, match="personalize.model"):
        run("<cat>", "cat", config(tmp_path / "missing"))
    with pytest.raises(ValueError, match="images"):
        train_textual_inversion([], "<cat>", "cat", config(model), tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_initializer_placeholder_and_identity(tiny_sd):
    from transformers import CLIPTokenizer

    model, _ = tiny_sd
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    assert initializer_for("tabby cat", tokenizer, config(model)) == "cat"
    assert initializer_for("Tabby_Cat", None, config(model)) == "cat"  # None: the model's tokenizer is loaded
    assert initializer_for("waterbird", tokenizer, config(model)) == "object"
    assert initializer_for("waterbird", tokenizer, config(model, initializer_token="bird")) == "bird"
    assert initializer_for("not_tabby_cat", tokenizer, config(model)) == "cat"  # negations are skipped
    per_class = config(model, initializer_tokens={"waterbird": "cat"}, initializer_token="object")
    assert initializer_for("waterbird", tokenizer, per_class) == "cat"  # the per-class word wins


def test_initial_words_are_checked_before_the_run(tiny_sd):
    """Both CelebA-style classes would start from the same word, a word may be split: found up front, by name."""
    model, _ = tiny_sd
    problems = check_initializers(["Tabby_Cat", "not_Tabby_Cat", "waterbird"], config(model))
    assert any("'Tabby_Cat', 'not_Tabby_Cat'] would all start from 'cat'" in p for p in problems)
    problems = check_initializers(["waterbird"], config(model, initializer_tokens={"waterbird": "dog"}))
    assert problems == ["personalize.initializer_tokens['waterbird']='dog': the tokenizer splits it into 3 tokens; "
                        "give one word it knows whole"]
    assert check_initializers(["Tabby_Cat", "waterbird"], config(model)) == []
    assert placeholder_for("dog sled", config(model)) == "<dog_sled>"
    assert personalize_identity(config(model)).startswith(f"textual-inversion:{model.resolve()}@")
    assert personalize_identity(PersonalizeConfig()).startswith("textual-inversion:runwayml/stable-diffusion-v1-5:")
    assert personalize_identity(PersonalizeConfig(backend="none")) == "none"


def edit(class_name, path, kept=True, group=None, source="edit-remove"):
    return {"class_name": class_name, "path": path, "kept": kept, "top_k_group": group, "source": source}


def test_select_training_images_falls_back():
    rows = [edit("bird", "a.png", group=0), edit("bird", "b.png", group=1), edit("bird", "c.png"),
            edit("bird", "d.png", kept=False, group=None), edit("bird", "e.png", source="edit-background"),
            edit("dog", "f.png", group=0), {"class_name": "bird", "path": "orig.png", "source": "train", "kept": True}]
    paths, rule, _ = select_training_images(rows, "bird", 2)
    assert (rule, [p.name for p in paths]) == ("top-k", ["a.png", "b.png"])
    paths, rule, reason = select_training_images(rows, "bird", 3)
    assert (rule, [p.name for p in paths]) == ("all-kept", ["a.png", "b.png", "c.png", "e.png"])
    assert "only 2 kept edits of the top-k groups" in reason
    assert select_training_images(rows, "bird", 5) == ([], "none", "only 4 kept edits (< min_images)")
    assert select_training_images(rows, "cat", 1) == ([], "none", "only 0 kept edits (< min_images)")
    with pytest.raises(ValueError, match="min_images"):
        select_training_images(rows, "bird", 0)


def test_the_stage_commits_one_part_per_class(tiny_sd, tmp_path):
    model, images = tiny_sd
    store = StageStore(tmp_path, "personalize", "key")
    cfg = config(model, steps=2)
    marker = personalize_class_task.fn(store, "tabby cat", [str(p) for p in images[:3]], cfg)
    part = store.part_dir(part_name("tabby cat"))
    assert marker["placeholder"] == "<tabby_cat>" and marker["initializer"] == "cat" and not marker["cached"]
    assert list(load_file(str(part / EMBEDS_FILE))) == ["<tabby_cat>"] and store.read_marker(part.name)
    assert not (store.root / "checkpoints" / part.name).exists()
    assert personalize_class_task.fn(store, "tabby cat", [str(p) for p in images[:3]], cfg)["cached"]
    assert not personalize_class_task.fn(store, "tabby cat", [str(p) for p in images[1:]], cfg)["cached"]


def test_learned_tokens_feed_the_generate_stage(tiny_sd, tmp_path):
    """personalize -> generate (textual-inversion backend) through the stage functions, on the tiny SD."""
    from aspire.config import GenerateConfig
    from tasks.generate import plan_jobs, run_generate_sd

    model, images = tiny_sd
    store = StageStore(tmp_path, "personalize", "key")
    marker = personalize_class_task.fn(store, "tabby cat", [str(p) for p in images[:3]], config(model, steps=2))
    tokens = {"tabby cat": (str(store.part_dir(part_name("tabby cat")) / EMBEDS_FILE), marker["placeholder"])}
    jobs = plan_jobs({"tabby cat": 3, "dog": 1}, {"tabby cat": 0, "dog": 1}, seed=0)
    generate_config = GenerateConfig(steps=2, resolution=32, batch_size=2, safety_checker=False, device="cpu")
    (tmp_path / "out").mkdir()
    result = run_generate_sd(jobs, generate_config, str(model), tokens, {"tabby cat": [["sofa"]]}, tmp_path / "out")
    assert [r["class_name"] for r in result.rows] == ["tabby cat"] * 3
    assert all(Image.open(r["path"]).size == (32, 32) and r["token"] == "<tabby_cat>" for r in result.rows)
    assert result.rows[0]["spurious_avoided"] == [["sofa"]] and len({r["seed"] for r in result.rows}) == 3
    assert result.quarantine == [{"image_id": "gen::dog::0", "path": None, "reason": "no learned token for 'dog'"}]
