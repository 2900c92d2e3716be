"""Stable Diffusion backend of the ``generate`` stage: new images of a class from its learned token.

ASPIRE Sec. 2(5) (https://arxiv.org/abs/2308.10103): Stable Diffusion personalised by textual inversion
(Gal et al., 2023, https://arxiv.org/abs/2208.01618) on the class's non-spurious edits is prompted to
"generate n x diverse samples" of the class; the prompt is ``prompts/generate_prompt.txt`` ("a photo of a
{token}"). Each image has its own ``torch.Generator`` seeded with the image's seed, so an image depends on its
seed only, not on the other images of its batch. Images the safety checker flags are dropped and counted.

:class:`ClipFilter` optionally drops generations that still look like one of the class's top-k spurious
phrases: CLIP (Radford et al., 2021, https://arxiv.org/abs/2103.00020) cosine similarity between the image and
"a photo of {phrase}" at or above ``generate.clip_threshold``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from aspire.lazy import resolve_device
from aspire.config import GenerateConfig
from aspire.identity import expand_ref, model_identity
from aspire.manifest import digest
from tasks.extract import prompt_file

log = logging.getLogger(__name__)

BACKEND = "textual-inversion"
FILTERED = "filtered by the safety checker"
CLIP_TEXT = "a photo of {phrase}"
_CLIP_BATCH = 64  # images per CLIP forward: small next to the model, bounded memory for big shards
# -- identity ------------------------------------------------------------------------------------------------


def _template(config: GenerateConfig) -> str:
    """The prompt template (``{token}``, ``{class_name}``) from ``prompts/``."""
    return prompt_file(config.prompt).read_text(encoding="utf-8").strip()


def generator_identity(config: GenerateConfig, model: str) -> str:
    """What the generations depend on beyond the config and the learned embeddings, without loading anything:
    ``textual-inversion:<model identity>:prompt=<digest of the template text>``."""
    return f"{BACKEND}:{model_identity(model)}:prompt={digest({'template': _template(config)})}"


def clip_identity(config: GenerateConfig) -> str:
    """``clip:<hub id>`` or ``clip:<absolute folder>@<digest>``, without loading the model."""
    return f"clip:{model_identity(config.clip_model)}"


# -- checks --------------------------------------------------------------------------------------------------


def _check_folder(key: str, name: str) -> None:
    """A path-like model name must be an existing folder (anything else is taken for a hub id)."""
    ref = expand_ref(name)
    if (ref.startswith(("/", ".")) or Path(ref).exists()) and not Path(ref).is_dir():
        raise ValueError(f"{key}={name!r}: no such folder (expected a local model folder or a hub id)")


def _check_device(config: GenerateConfig) -> torch.device:
    """``generate.device`` as a usable torch device."""
    try:
        device = resolve_device(config.device)
    except RuntimeError as exc:
        raise ValueError(f"generate.device={config.device!r}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"generate.device={config.device!r}: CUDA is not available here (use 'auto' or 'cpu')")
    return device


def _check_generator(config: GenerateConfig, model: str) -> tuple[torch.device, torch.dtype]:
    """Validate up front; returns (device, dtype): float16 on CUDA, float32 elsewhere.

    Raises:
        ValueError: naming ``personalize.model``, ``generate.backend``, ``.resolution``, ``.device`` or ``.dtype``.
    """
    if config.backend != BACKEND:
        raise ValueError(f"generate.backend={config.backend!r}: this loader builds {BACKEND!r} generators")
    _check_folder("personalize.model", model)
    if config.resolution % 8:
        raise ValueError(f"generate.resolution={config.resolution}: expected a multiple of 8 (the VAE downsamples 8x)")
    device = _check_device(config)
    dtype_name = getattr(config, "dtype", "auto")  # GenerateConfig has no dtype field (yet): auto
    if dtype_name == "float16" and device.type == "cpu":
        raise ValueError(f"generate.dtype='float16' on device {device}: half precision needs a GPU")
    half = dtype_name == "float16" or (dtype_name == "auto" and device.type == "cuda")
    return device, torch.float16 if half else torch.float32


def _check_seeds(seeds: list[int]) -> None:
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**63]
    if bad:
        raise ValueError(f"generate: seeds must be integers in [0, 2**63), got {bad[:5]}")


# -- the generator -------------------------------------------------------------------------------------------


class SDGenerator:
    """Stable Diffusion v1.x with learned textual-inversion tokens (ASPIRE Sec. 2(5)).

    Args:
        config: the ``generate`` section (prompt, steps, guidance, resolution, batch_size, safety_checker, device).
        model: the Stable Diffusion the tokens were learned on (``personalize.model``): hub id or local folder.

    Attributes:
        filtered: images dropped by the safety checker so far.

    Raises:
        ValueError: see :func:`_check_generator`; a model that does not load as a StableDiffusionPipeline.
        FileNotFoundError: the prompt file does not exist.
    """

    def __init__(self, config: GenerateConfig, model: str) -> None:
        from diffusers import StableDiffusionPipeline

        # 1. Check the config and read the prompt
        self.device, self.dtype = _check_generator(config, model)
        self.config, self.model = config, model
        self.template = _template(config)
        self.identity = generator_identity(config, model)
        # 2. Load the pipeline (without its safety checker when disabled: nothing is loaded for it)
        kwargs = {} if config.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = StableDiffusionPipeline.from_pretrained(expand_ref(model), torch_dtype=self.dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(f"personalize.model={model!r}: cannot load a StableDiffusionPipeline as a local "
                             f"folder or hub id ({type(exc).__name__}: {exc})") from exc
        if config.safety_checker and pipe.safety_checker is None:
            log.warning("generate: generate.safety_checker is on but %s has no safety checker; nothing is filtered",
                        model)
        # 3. Device, no per-call progress bars
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.filtered = 0
        self._tokens: dict[str, str] = {}  # token -> digest of the embeddings file it was loaded from
        self._lock = threading.Lock()  # one pipeline call (or token load) at a time per worker
        log.info("generate: loaded %s on %s (%s, safety checker %s)", self.identity, self.device, self.dtype,
                 pipe.safety_checker is not None)

    def load_token(self, embeds_path: Path, token: str) -> None:
        """Add ``token`` with the embedding(s) in ``embeds_path`` (diffusers ``learned_embeds.safetensors`` or
        ``.bin``). Loading the same file again does nothing; another file for a loaded token replaces it.

        Raises:
            ValueError: the file does not exist or is not a textual-inversion embedding; ``token`` is empty or a
                word the tokenizer already knows.
        """
        path = Path(embeds_path)
        if not token.strip():
            raise ValueError(f"load_token: token={token!r}: expected a placeholder such as '<dog>'")
        if not path.is_file():
            raise ValueError(f"load_token: embeds_path={str(path)!r}: no such file")
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._lock:
            if self._tokens.get(token) == content:
                return
            if token in self._tokens:
                self.pipe.unload_textual_inversion(self._added(token))
                del self._tokens[token]
            try:
                self.pipe.load_textual_inversion(str(path), token=token)
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"load_token: cannot load {str(path)!r} as token {token!r} "
                                 f"({type(exc).__name__}: {exc})") from exc
            self._tokens[token] = content
        log.info("generate: loaded token %s from %s", token, path)

    def _added(self, token: str) -> list[str]:
        """The tokenizer entries of a loaded token (multi-vector tokens add ``<t>_1``, ``<t>_2``, ...)."""
        vocab = self.pipe.tokenizer.get_vocab()
        extra, i = [], 1
        while f"{token}_{i}" in vocab:
            extra.append(f"{token}_{i}")
            i += 1
        return [token] + extra

    def _batch(self, prompt: str, seeds: list[int]) -> list[Image.Image | str]:
        """One pipeline call: one CPU generator per image (the same noise on every device and in any batch)."""
        side = self.config.resolution
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with self._lock:
            result = self.pipe(prompt=[prompt] * len(seeds), num_inference_steps=self.config.steps,
                               guidance_scale=self.config.guidance, height=side, width=side,
                               generator=generators, output_type="pil")
            flagged = result.nsfw_content_detected or [False] * len(seeds)
            self.filtered += sum(bool(f) for f in flagged)
        return [FILTERED if bad else image.convert("RGB") for image, bad in zip(result.images, flagged, strict=True)]

    def generate(self, class_name: str, token: str, seeds: list[int]) -> list[tuple[int, Image.Image | str]]:
        """One image per seed of ``class_name`` from the prompt template filled with ``token``.

        Args:
            class_name: the class (fills ``{class_name}`` in the template).
            token: its learned placeholder, loaded with :meth:`load_token` first.
            seeds: one per image; the same seed gives the same image whatever the batch.

        Returns:
            ``(seed, image)`` per seed in order: a ``resolution`` x ``resolution`` RGB image, or the reason there
            is none (``"filtered by the safety checker"``).

        Raises:
            ValueError: a seed that is not an integer in [0, 2**63).
        """
        # 1. Check inputs and build the prompt
        _check_seeds(seeds)
        if token not in self._tokens:
            log.warning("generate: token %r was not loaded with load_token; it is read as plain text", token)
        prompt = self.template.format(token=token, class_name=class_name)
        # 2. Batches of ``batch_size``
        size = self.config.batch_size
        batches = [list(seeds[i : i + size]) for i in range(0, len(seeds), size)]
        results: list[tuple[int, Image.Image | str]] = []
        for chunk in tqdm(batches, desc=f"generate {class_name}", unit="batch", leave=False, disable=None):
            results += list(zip(chunk, self._batch(prompt, chunk), strict=True))
        return results


# -- the CLIP filter -----------------------------------------------------------------------------------------


class ClipFilter:
    """Drops generations that still match a spurious phrase: max CLIP cosine similarity to "a photo of
    {phrase}" at or above ``generate.clip_threshold``.

    Raises:
        ValueError: ``generate.clip_model`` is a missing folder or does not load; bad ``generate.device``.
    """

    def __init__(self, config: GenerateConfig) -> None:
        from transformers import CLIPModel, CLIPProcessor

        _check_folder("generate.clip_model", config.clip_model)
        self.device = _check_device(config)
        self.config = config
        self.identity = clip_identity(config)
        try:
            self.processor = CLIPProcessor.from_pretrained(expand_ref(config.clip_model))
            model = CLIPModel.from_pretrained(expand_ref(config.clip_model))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"generate.clip_model={config.clip_model!r}: cannot load a CLIP model and processor "
                             f"as a local folder or hub id ({type(exc).__name__}: {exc})") from exc
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()
        log.info("generate: loaded CLIP filter %s on %s", self.identity, self.device)

    def text_features(self, phrases: list[str]) -> torch.Tensor:
        """L2-normalised CLIP features of "a photo of {phrase}", (M, D)."""
        texts = [CLIP_TEXT.format(phrase=p) for p in phrases]
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        with self._lock, torch.inference_mode():
            features = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"])  # (M, D)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image features, (N, D)."""
        parts = []
        for start in range(0, len(images), _CLIP_BATCH):
            chunk = [im.convert("RGB") for im in images[start : start + _CLIP_BATCH]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)  # (B, 3, S, S)
            with self._lock, torch.inference_mode():
                parts.append(self.model.get_image_features(pixel_values=pixels).float())  # (B, D)
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    def scores(self, images: list[Image.Image], phrases: list[str]) -> np.ndarray:
        """Cosine similarities, shape (n_images, n_phrases), float32 in [-1, 1]."""
        if not images or not phrases:
            return np.zeros((len(images), len(phrases)), dtype=np.float32)
        sims = self.image_features(images) @ self.text_features(phrases).T  # (N, M)
        return sims.cpu().numpy().astype(np.float32)

    def keep(self, images: list[Image.Image], phrases: list[str]) -> list[bool]:
        """Per image, whether it matches none of the phrases (max score < ``clip_threshold``); no phrases: all."""
        phrases = [p.strip() for p in phrases if p and p.strip()]
        if not phrases:
            return [True] * len(images)
        return [bool(best < self.config.clip_threshold) for best in self.scores(images, phrases).max(axis=1)]


# -- loaders (once per worker) -------------------------------------------------------------------------------

_generators: dict[str, SDGenerator] = {}
_clips: dict[str, ClipFilter] = {}
_lock = threading.Lock()
_GENERATOR_FIELDS = {"backend", "prompt", "steps", "guidance", "resolution", "batch_size", "safety_checker", "device"}


def load_generator(config: GenerateConfig, model: str) -> SDGenerator:
    """The generator for this section and model, built once per worker process (configs that differ only in
    fields it does not use share it). Raises as :class:`SDGenerator`."""
    key = f"{model}\0{config.model_dump_json(include=_GENERATOR_FIELDS)}"
    with _lock:
        if key not in _generators:
            _generators[key] = SDGenerator(config, model)
        return _generators[key]


def load_clip_filter(config: GenerateConfig) -> ClipFilter:
    """The CLIP filter for this section, built once per worker process. Raises as :class:`ClipFilter`."""
    key = config.model_dump_json(include={"clip_model", "clip_threshold", "device"})
    with _lock:
        if key not in _clips:
            _clips[key] = ClipFilter(config)
        return _clips[key]
