"""ASPIRE step 5, ``personalize``: learn one new token per class by textual inversion of Stable Diffusion.

ASPIRE Sec. 2(5) (https://arxiv.org/abs/2308.10103) personalises Stable Diffusion with textual inversion (Gal et
al., 2023, https://arxiv.org/abs/2208.01618) on each class's non-spurious images, "by just fine-tuning a single
token in the embedding layer". :func:`train_textual_inversion` does this in process, following diffusers'
``examples/textual_inversion/textual_inversion.py``: a placeholder token initialised from one existing token,
VAE, UNet and the rest of the text encoder frozen, AdamW on the token embedding with every other row restored
after each optimiser step, the noise-prediction MSE loss, and prompts from ``prompts/textual_inversion_templates.txt``.

Training images (:func:`select_training_images`), per class, by the rule the composite generator follows too
(:func:`tasks.collapse.training_edits`): the kept edits of its top-k groups, claimed by the report or not (ASPIRE
Algorithm 1's D_synth^k); fewer than ``min_images``: all its kept edits; still fewer: none, and the class is skipped
with the reason.

Determinism and resuming: every random draw of optimiser step ``s`` (data order, flips, templates, latent sample,
noise, timesteps) comes from generators seeded by ``(seed, s)``, so no RNG state has to be carried between
steps. Every ``checkpoint_every`` steps the learned row, its AdamW moments and the step are written atomically to
``checkpoint_dir``; a later call with the same model, images, tokens and settings continues from there and ends
with the same embedding as an uninterrupted run.

Outputs in ``out_dir``: ``learned_embeds.safetensors`` (``{placeholder: (1, dim) float32}``, the format
``StableDiffusionPipeline.load_textual_inversion`` reads) and ``token.json``. In the stage, each class's token is
one committed part of the stage folder (:func:`personalize_class`, :func:`part_name`); its checkpoints live in
``<stage folder>/checkpoints/<part>/`` until the part is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from aspire.cache import StageStore, file_digest
from aspire.lazy import resolve_device
from aspire.config import PersonalizeConfig
from aspire.identity import expand_ref, model_identity
from aspire.images import load_rgb
from aspire.manifest import Row, digest
from tasks.extract import prompt_file
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "personalize"
VERSION = 2
BACKEND = "textual-inversion"
TEMPLATES = "textual_inversion_templates.txt"
EMBEDS_FILE = "learned_embeds.safetensors"
TOKEN_FILE = "token.json"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # the reference script's defaults
FLIP_P = 0.5  # random horizontal flip, as in the reference script
# settings that do not change the trajectory: a checkpoint stays valid when only these differ
_NOT_IN_FINGERPRINT = {"backend", "steps", "checkpoint_every", "min_images", "device", "initializer_token"}


# -- identity, tokens and images -----------------------------------------------------------------------------


def templates() -> list[str]:
    """The prompt templates (``{}`` is the placeholder), one per line of the templates file; ``#`` lines skipped.

    Raises:
        ValueError: a template without exactly one ``{}``, or none at all.
    """
    path = prompt_file(TEMPLATES)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in found if t.count("{}") != 1]
    if bad or not found:
        raise ValueError(f"{path}: expected templates with exactly one '{{}}' each, got {bad or 'none'}")
    return found


def personalize_identity(config: PersonalizeConfig) -> str:
    """What the learned tokens depend on beyond the config, without loading the model.

    ``none``, ``textual-inversion:<hub id>`` or ``textual-inversion:<absolute folder>@<digest>``, then
    ``:templates=<digest>`` of the prompt templates.
    """
    if config.backend == "none":
        return "none"
    model = model_identity(config.model)
    return f"{BACKEND}:{model}:templates={digest(templates())}"


def placeholder_for(class_name: str, config: PersonalizeConfig) -> str:
    """``personalize.placeholder`` filled with the class name (whitespace becomes ``_``: one added token)."""
    return config.placeholder.format(class_name=re.sub(r"\s+", "_", class_name.strip()))


def load_tokenizer(config: PersonalizeConfig):
    """The CLIP tokenizer of ``personalize.model`` (subfolder ``tokenizer``).

    Raises:
        ValueError: naming ``personalize.model`` when it cannot be loaded.
    """
    from transformers import CLIPTokenizer

    return _from_pretrained(CLIPTokenizer, config, "tokenizer")


NEGATIONS = {"not", "no", "non", "without"}


def initializer_for(class_name: str, tokenizer, config: PersonalizeConfig) -> str:
    """The word the class's new embedding starts from (not checked here: :func:`check_initializers` does).

    ``personalize.initializer_tokens[class_name]``, else ``personalize.initializer_token``, else the class name's
    last word that is one token of the tokenizer and not a negation ("not_Blond_Hair" -> "hair", as for
    "Blond_Hair": set ``initializer_tokens`` when two classes would start alike), else ``"object"``
    (``tokenizer=None``: the model's tokenizer is loaded, a small file).
    """
    if class_name in config.initializer_tokens:
        return config.initializer_tokens[class_name]
    if config.initializer_token:
        return config.initializer_token
    words = [w for w in re.findall(r"[a-z0-9]+", class_name.lower()) if w not in NEGATIONS]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    return next((w for w in reversed(words) if len(tokenizer.encode(w, add_special_tokens=False)) == 1), "object")


def check_initializers(class_names: list[str], config: PersonalizeConfig, tokenizer=None) -> list[str]:
    """One line per problem with the classes' initial words: a word the tokenizer splits into several tokens, or
    two classes starting from the same word (their tokens would start identical). Empty when all is well."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    words = {name: initializer_for(name, tokenizer, config) for name in class_names}
    problems = [f"personalize.initializer_tokens[{name!r}]={word!r}: the tokenizer splits it into "
                f"{len(tokenizer.encode(word, add_special_tokens=False))} tokens; give one word it knows whole"
                for name, word in words.items() if len(tokenizer.encode(word, add_special_tokens=False)) != 1]
    by_word: dict[str, list[str]] = {}
    for name, word in words.items():
        by_word.setdefault(word, []).append(name)
    problems += [f"personalize.initializer_tokens: classes {names} would all start from {word!r}; give each its "
                 f"own word (e.g. {{{names[0]!r}: ..., {names[1]!r}: ...}})"
                 for word, names in by_word.items() if len(names) > 1 and not config.initializer_token]
    return problems


def select_training_images(rows: list[Row], class_name: str, min_images: int) -> tuple[list[Path], str, str]:
    """The class's training images (the edited files) and which rule chose them: :func:`tasks.collapse.training_edits`.

    Returns:
        (paths in manifest order, ``"top-k"`` | ``"all-kept"`` | ``"none"``, a reason for the summary).

    Raises:
        ValueError: ``min_images`` below 1.
    """
    from tasks.collapse import training_edits

    edits, rule, reason = training_edits(rows, class_name, min_images)
    return [Path(r["path"]) for r in edits], rule, reason


def _pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Center-cropped square, resized (bicubic): (3, R, R) float32 in [-1, 1]."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _seeded(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (same numbers on every device and in every process)."""
    value = int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big") >> 1
    return torch.Generator("cpu").manual_seed(value)


# -- models --------------------------------------------------------------------------------------------------


@dataclass
class SDModels:
    """The frozen parts of Stable Diffusion, and the text encoder whose token embedding is trained."""

    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any


def _from_pretrained(loader, config: PersonalizeConfig, subfolder: str):
    try:
        return loader.from_pretrained(expand_ref(config.model), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise ValueError(f"personalize.model={config.model!r}: cannot load {loader.__name__} from its "
                         f"{subfolder!r} subfolder ({type(exc).__name__}: {exc})") from exc


def load_models(config: PersonalizeConfig) -> SDModels:
    """Text encoder, VAE, UNet and a DDPM noise scheduler of ``personalize.model`` (fresh copies: they are changed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    return SDModels(_from_pretrained(CLIPTextModel, config, "text_encoder"),
                    _from_pretrained(AutoencoderKL, config, "vae"),
                    _from_pretrained(UNet2DConditionModel, config, "unet"),
                    _from_pretrained(DDPMScheduler, config, "scheduler"))


def _check(images: list[Path], placeholder: str, config: PersonalizeConfig) -> tuple[torch.device, torch.dtype]:
    """Validate before loading anything; returns (device, dtype of the frozen VAE and UNet)."""
    model = expand_ref(config.model)
    if config.backend != BACKEND:
        raise ValueError(f"personalize.backend={config.backend!r}: only {BACKEND!r} trains a token")
    if (model.startswith(("/", ".")) or Path(model).exists()) and not Path(model).is_dir():
        raise ValueError(f"personalize.model={config.model!r}: no such folder (expected a local diffusers "
                         "Stable Diffusion folder or a hub id)")
    if config.resolution % 8:
        raise ValueError(f"personalize.resolution={config.resolution}: expected a multiple of 8")
    if not images:
        raise ValueError("images: empty; textual inversion needs at least one training image")
    if not placeholder or any(c.isspace() for c in placeholder):
        raise ValueError(f"personalize.placeholder={placeholder!r}: expected a non-empty token without spaces")
    device = resolve_device(config.device)
    if config.mixed_precision in ("fp16", "bf16") and device.type != "cuda":
        raise ValueError(f"personalize.mixed_precision={config.mixed_precision!r} on device {device}: mixed "
                         "precision needs a GPU (use 'auto' or 'no')")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16, "auto": torch.float16}
    return device, half.get(config.mixed_precision, torch.float32) if device.type == "cuda" else torch.float32


def _add_placeholder(tokenizer, placeholder: str, initializer: str) -> tuple[int, int]:
    """Add the placeholder to the tokenizer; returns (placeholder id, initializer id)."""
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"personalize.initializer_token={initializer!r}: the tokenizer splits it into "
                         f"{len(init_ids)} tokens; expected exactly one")
    if placeholder in tokenizer.get_vocab() or tokenizer.add_tokens(placeholder) == 0:
        raise ValueError(f"personalize.placeholder={placeholder!r}: already a token of the tokenizer; choose a "
                         "new one (e.g. '<{class_name}>')")
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    assert tokenizer.encode(placeholder, add_special_tokens=False) == [placeholder_id]
    return placeholder_id, init_ids[0]


def _prepare_models(models: SDModels, rows: int, ids: tuple[int, int], config: PersonalizeConfig,
                    device: torch.device, dtype: torch.dtype) -> torch.nn.Embedding:
    """Grow the embedding to ``rows``, initialise the new row, freeze all else; returns the token embedding."""
    if models.text_encoder.get_input_embeddings().num_embeddings < rows:
        models.text_encoder.resize_token_embeddings(rows, mean_resizing=False)
    embedding = models.text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[ids[0]] = embedding.weight[ids[1]].clone()
    for module in (models.text_encoder, models.vae, models.unet):
        module.requires_grad_(False).eval()  # no dropout in CLIP/UNet/VAE: eval == train, but deterministic
    embedding.weight.requires_grad_(True)
    models.text_encoder.to(device)  # float32: its embedding is trained
    models.vae.to(device, dtype)
    models.unet.to(device, dtype)
    if config.gradient_checkpointing and device.type == "cuda":
        models.unet.enable_gradient_checkpointing()
    return embedding


# -- data ----------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """Latents of every image (then of every mirrored image) and the template prompts' token ids."""

    mean: torch.Tensor  # (2n, C, h, w) float32 on the device
    std: torch.Tensor  # (2n, C, h, w)
    ids: torch.Tensor  # (T, L) int64 on the device
    seed: int
    repeats: int
    _perm: tuple[int, torch.Tensor] = field(default=(-1, torch.empty(0)))

    def image_of(self, index: int) -> int:
        """The image (0..n-1) at position ``index`` of the stream of shuffled epochs (n x repeats items each)."""
        n = self.mean.shape[0] // 2
        epoch, position = divmod(index, n * self.repeats)
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n * self.repeats, generator=_seeded(self.seed, "epoch", epoch)))
        return int(self._perm[1][position]) % n


@torch.no_grad()
def _prepare_data(images: list[Path], placeholder: str, tokenizer, vae, config: PersonalizeConfig,
                  device: torch.device, dtype: torch.dtype) -> _Data:
    """Encode each image and its mirror image once (the VAE is frozen; only the sample is drawn per step)."""
    pixels = torch.stack([_pixels(load_rgb(p), config.resolution) for p in images])  # (n, 3, R, R)
    pixels = torch.cat([pixels, pixels.flip(-1)])
    means, stds = [], []
    for chunk in pixels.split(8):
        dist = vae.encode(chunk.to(device, dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    prompts = [t.format(placeholder) for t in templates()]
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return _Data(torch.cat(means), torch.cat(stds), ids.to(device), config.seed, config.repeats)


# -- training ------------------------------------------------------------------------------------------------


def _micro_loss(models: SDModels, data: _Data, config: PersonalizeConfig, step: int, micro: int,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The noise-prediction loss of micro-batch ``micro`` of optimiser step ``step``."""
    size = config.batch_size
    first = (step * config.gradient_accumulation + micro) * size
    gen = _seeded(config.seed, "batch", step, micro)
    flips = (torch.rand(size, generator=gen) < FLIP_P).long()
    which = torch.tensor([data.image_of(first + b) for b in range(size)]) + flips * (data.mean.shape[0] // 2)
    prompt = torch.randint(len(data.ids), (size,), generator=gen)
    eps = torch.randn((size, *data.mean.shape[1:]), generator=gen).to(device)
    noise = torch.randn((size, *data.mean.shape[1:]), generator=gen).to(device, dtype)
    timesteps = torch.randint(0, models.scheduler.config.num_train_timesteps, (size,), generator=gen).to(device)
    which = which.to(device)
    latents = ((data.mean[which] + data.std[which] * eps) * models.vae.config.scaling_factor).to(dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        noisy = models.scheduler.add_noise(latents, noise, timesteps)
        hidden = models.text_encoder(data.ids[prompt.to(device)])[0].to(dtype)
        pred = models.unet(noisy, timesteps, hidden).sample
    kind = models.scheduler.config.prediction_type
    target = noise if kind == "epsilon" else models.scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float()) / config.gradient_accumulation


def _fingerprint(images: list[Path], placeholder: str, initializer: str, config: PersonalizeConfig) -> str:
    """Everything the trajectory depends on: a checkpoint with another fingerprint is not resumed."""
    return digest({"format": CHECKPOINT_FORMAT, "identity": personalize_identity(config),
                   "config": config.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT),
                   "placeholder": placeholder, "initializer": initializer,
                   "images": [file_digest(Path(p)) for p in images]})


def _save_checkpoint(checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically (temporary file, fsync, rename)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".{CHECKPOINT_FILE}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, checkpoint_dir / CHECKPOINT_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def _checkpoint_state(step: int, loss: float, fingerprint: str, weight: torch.Tensor, row: int,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """The learned row, its AdamW moments (AdamW is elementwise: other rows' moments never matter) and the step."""
    adam = optimizer.state.get(weight) or {}
    return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": step, "loss": loss,
            "row": weight[row].detach().cpu().clone(),
            "adam_step": adam["step"].detach().cpu().clone() if adam else None,
            "exp_avg": adam["exp_avg"][row].detach().cpu().clone() if adam else None,
            "exp_avg_sq": adam["exp_avg_sq"][row].detach().cpu().clone() if adam else None,
            "scaler": scaler.state_dict()}


def _resume(checkpoint_dir: Path, fingerprint: str, steps: int, weight: torch.Tensor, row: int,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> tuple[int, float | None]:
    """Restore the last checkpoint when it belongs to this run; returns (steps done, last loss)."""
    path = checkpoint_dir / CHECKPOINT_FILE
    if not path.is_file():
        return 0, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file is only a lost checkpoint
        log.warning("personalize: unreadable checkpoint %s (%s); starting over", path, exc)
        return 0, None
    if state.get("fingerprint") != fingerprint or not 0 < state.get("step", 0) <= steps:
        log.warning("personalize: checkpoint %s is from another run (or past %d steps); starting over", path, steps)
        return 0, None
    with torch.no_grad():
        weight[row] = state["row"].to(weight)
    if state["adam_step"] is not None:
        moments = {k: torch.zeros_like(weight) for k in ("exp_avg", "exp_avg_sq")}
        for k, m in moments.items():
            m[row] = state[k].to(m)
        optimizer.state[weight] = {"step": state["adam_step"], **moments}
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    log.info("personalize: resumed from %s at step %d", path, state["step"])
    return state["step"], state["loss"]


def train_textual_inversion(images: list[Path], placeholder: str, initializer: str, config: PersonalizeConfig,
                            out_dir: Path, checkpoint_dir: Path, *, log_every: int = 50) -> dict[str, Any]:
    """Learn the embedding of ``placeholder`` from ``images`` (textual inversion, Gal et al. 2023, Sec. 3).

    Args:
        images: training images (any size; center-cropped and resized to ``personalize.resolution``).
        placeholder: the new token, e.g. ``"<waterbird>"`` (see :func:`placeholder_for`).
        initializer: one existing token its embedding starts from (see :func:`initializer_for`).
        config: the ``personalize`` section (model, steps, lr, scale_lr, batch_size, gradient_accumulation,
            resolution, repeats, checkpoint_every, mixed_precision, gradient_checkpointing, seed, device).
        out_dir: receives ``learned_embeds.safetensors`` and ``token.json``.
        checkpoint_dir: resumable checkpoints (resumed from when they belong to the same run).
        log_every: steps between loss log lines.

    Returns:
        ``token.json``'s content (placeholder, initializer, images, steps, final_loss), plus ``resumed_from``
        (the step a checkpoint gave) and ``seconds``.

    Raises:
        ValueError: bad ``personalize.backend``/``model``/``resolution``/``mixed_precision``/``placeholder``
            (one already in the vocabulary), an ``initializer_token`` of several tokens, no images, or
            ``log_every`` below 1.
        aspire.images.ImageError: an image does not load.
        RuntimeError: after training, a parameter other than the new row changed.
    """
    from safetensors.torch import save as safetensors_bytes

    start_time = time.perf_counter()
    # 1. Check inputs; add the placeholder to the tokenizer
    device, dtype = _check(images, placeholder, config)
    if log_every < 1:
        raise ValueError(f"log_every={log_every}: expected at least 1")
    tokenizer = load_tokenizer(config)
    row, init_row = _add_placeholder(tokenizer, placeholder, initializer)
    # 2. Models: everything frozen except the token embedding, whose new row starts as the initializer's
    models = load_models(config)
    embedding = _prepare_models(models, len(tokenizer), (row, init_row), config, device, dtype)
    original = embedding.weight.detach().clone()
    others = torch.ones(len(original), dtype=torch.bool, device=original.device)
    others[row] = False
    # 3. Data, optimiser (lr scaled as in the reference script), resume
    data = _prepare_data(images, placeholder, tokenizer, models.vae, config, device, dtype)
    lr = config.lr * (config.batch_size * config.gradient_accumulation if config.scale_lr else 1)
    optimizer = torch.optim.AdamW([embedding.weight], lr=lr, **ADAMW)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    fingerprint = _fingerprint(images, placeholder, initializer, config)
    start, loss = _resume(Path(checkpoint_dir), fingerprint, config.steps, embedding.weight, row, optimizer, scaler)
    # 4. Optimiser steps; after each, every row but the new one is put back
    for step in tqdm(range(start, config.steps), initial=start, total=config.steps, leave=False,
                     desc=f"textual inversion {placeholder}", disable=None):
        loss = 0.0
        for micro in range(config.gradient_accumulation):
            micro_loss = _micro_loss(models, data, config, step, micro, device, dtype)
            scaler.scale(micro_loss).backward()
            loss += micro_loss.item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            embedding.weight[others] = original[others]
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            log.info("personalize %s: step %d/%d, loss %.5f", placeholder, done, config.steps, loss)
        if done % config.checkpoint_every == 0:
            _save_checkpoint(Path(checkpoint_dir), _checkpoint_state(done, loss, fingerprint, embedding.weight, row,
                                                                     optimizer, scaler))
    # 5. Check that only the new row was trained, then save
    if not torch.equal(embedding.weight[others], original[others]):
        raise RuntimeError(f"personalize {placeholder}: embedding rows other than the new one changed")
    trainable = [n for m in (models.text_encoder, models.vae, models.unet) for n, p in m.named_parameters()
                 if p.requires_grad and p is not embedding.weight]
    if trainable:
        raise RuntimeError(f"personalize {placeholder}: parameters other than the token embedding were trainable: "
                           f"{trainable[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    learned = embedding.weight[row : row + 1].detach().float().cpu().contiguous()  # (1, dim)
    # bytes first: safetensors' own file writer reports a full disk as a SafetensorError, not an OSError
    (out_dir / EMBEDS_FILE).write_bytes(safetensors_bytes({placeholder: learned}))
    info = {"placeholder": placeholder, "initializer": initializer, "images": [str(p) for p in images],
            "steps": config.steps, "final_loss": loss}
    (out_dir / TOKEN_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {**info, "resumed_from": start, "seconds": round(time.perf_counter() - start_time, 3)}


# -- the stage -----------------------------------------------------------------------------------------------


def part_name(class_name: str) -> str:
    """The stage part holding a class's token: ``token-<class name, file-safe>-<digest>``."""
    return f"token-{re.sub(r'[^A-Za-z0-9_.-]+', '_', class_name)[:40]}-{digest(class_name)[:8]}"


def personalize_class(store: StageStore, class_name: str, images: list[str | Path],
                      config: PersonalizeConfig) -> dict[str, Any]:
    """Learn (or reuse, when committed for these images) the class's token as the part :func:`part_name`.

    Returns:
        The part's marker: ``placeholder``, ``initializer``, ``images``, ``steps``, ``final_loss``, ``cached``, ...
    """
    placeholder = placeholder_for(class_name, config)
    initializer = initializer_for(class_name, None, config)
    paths = [Path(p) for p in images]
    name = part_name(class_name)
    checkpoints = store.root / "checkpoints" / name
    input_digest = digest({"images": [file_digest(p) for p in paths], "placeholder": placeholder,
                           "initializer": initializer})
    marker = store.ensure_part(name, lambda tmp: train_textual_inversion(paths, placeholder, initializer, config,
                                                                        tmp, checkpoints),
                               input_digest, (EMBEDS_FILE, TOKEN_FILE))
    shutil.rmtree(checkpoints, ignore_errors=True)  # committed: the checkpoints are no longer needed
    return marker


@task(name="personalize-class", task_run_name="personalize-{class_name}", tags=["gpu"], cache_policy=NO_CACHE,
      retries=1, retry_condition_fn=retry_if_transient)
def personalize_class_task(store: StageStore, class_name: str, images: list[str], config: PersonalizeConfig) -> dict:
    """Textual inversion of one class, committed as a part of the stage (a retry resumes from its checkpoint)."""
    return personalize_class(store, class_name, images, config)
