"""InstructPix2Pix backend of the ``background`` stage: turn an image's background into the alternative one.

ASPIRE Sec. 2(4.b) and Appendix A.6 (https://arxiv.org/abs/2308.10103) edit each image with InstructPix2Pix
(Brooks et al., 2023, https://arxiv.org/abs/2211.09800) and the instruction "turn the background from
{background} to {alt}" (``prompts/background_prompt.txt``), text guidance 7.5 and image guidance 1.5.

Implements :class:`tasks.vision.BackgroundEditor` with diffusers' ``StableDiffusionInstructPix2PixPipeline``:
images are resized to ``resolution`` x ``resolution``, edited ``batch_size`` at a time, and resized back.
Each image has its own generator seeded from ``background.seed`` and its ``image_id``, so an edit does not
depend on the other images of its batch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch
from PIL import Image

from aspire.lazy import resolve_device
from aspire.config import BackgroundConfig
from aspire.identity import expand_ref, model_identity
from aspire.manifest import Row, digest
from tasks.extract import prompt_file
from tasks.vision import BackgroundEditor

log = logging.getLogger(__name__)

BACKEND = "instruct-pix2pix"
NO_TEXT = "no background/alternative"
FILTERED = "filtered by the safety checker"
# -- identity ------------------------------------------------------------------------------------------------


def _template(config: BackgroundConfig) -> str:
    """The prompt template (``{background}``, ``{alt}``) from ``prompts/``."""
    return prompt_file(config.prompt).read_text(encoding="utf-8").strip()


def editor_identity(config: BackgroundConfig) -> str:
    """What the edits depend on beyond the config, without loading the model.

    ``instruct-pix2pix:<hub id>`` or ``instruct-pix2pix:<absolute folder>@<digest>``, then ``:prompt=<digest>``
    of the template text (editing the prompt file changes the identity).
    """
    model = model_identity(config.model)
    return f"{BACKEND}:{model}:prompt={digest({'template': _template(config)})}"


# -- the editor ----------------------------------------------------------------------------------------------


def _check_config(config: BackgroundConfig) -> tuple[torch.device, torch.dtype, type | None]:
    """Validate the section up front; returns (device, dtype, scheduler class or None).

    Raises:
        ValueError: naming ``background.model``, ``.resolution``, ``.dtype`` or ``.scheduler``.
    """
    import diffusers

    model = expand_ref(config.model)
    if (model.startswith(("/", ".")) or Path(model).exists()) and not Path(model).is_dir():
        raise ValueError(f"background.model={config.model!r}: no such folder (expected a local diffusers folder "
                         "or a hub id)")
    if config.resolution % 8:
        raise ValueError(f"background.resolution={config.resolution}: expected a multiple of 8")
    device = resolve_device(config.device)
    if config.dtype == "float16" and device.type == "cpu":
        raise ValueError(f"background.dtype='float16' on device {device}: half precision needs a GPU (use "
                         "'auto' or 'float32' on a CPU)")
    dtype = torch.float16 if config.dtype == "float16" or (config.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    scheduler = None
    if config.scheduler:
        scheduler = getattr(diffusers, config.scheduler, None)
        if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
            raise ValueError(f"background.scheduler={config.scheduler!r}: not a diffusers scheduler class (e.g. "
                             "'EulerAncestralDiscreteScheduler', 'DDIMScheduler', 'DPMSolverMultistepScheduler')")
    return device, dtype, scheduler


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed from ``background.seed`` and the image id (stable across processes and batches)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()[:8], "big") >> 1


class InstructPix2PixEditor:
    """InstructPix2Pix (https://arxiv.org/abs/2211.09800) background edits, ASPIRE A.6 settings by default.

    Args:
        config: the ``background`` section (model, prompt, text_cfg, image_cfg, steps, scheduler, resolution,
            batch_size, dtype, safety_checker, seed, device).

    Raises:
        ValueError: bad ``background.model`` (missing folder or not loadable), ``resolution``, ``dtype`` or
            ``scheduler``.
        FileNotFoundError: the prompt file does not exist.
    """

    def __init__(self, config: BackgroundConfig) -> None:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        # 1. Check the config and read the prompt
        self.device, self.dtype, scheduler = _check_config(config)
        self.config = config
        self.template = _template(config)
        self.identity = editor_identity(config)
        # 2. Load the pipeline (without its safety checker when disabled: nothing is loaded for it)
        kwargs = {} if config.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(expand_ref(config.model), torch_dtype=self.dtype,
                                                                          **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(f"background.model={config.model!r}: cannot load an InstructPix2Pix pipeline as a "
                             f"local folder or hub id ({type(exc).__name__}: {exc})") from exc
        # 3. Scheduler swap, device, no per-batch progress bars
        if scheduler is not None:
            pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()  # one pipeline call at a time per worker: bounded GPU memory
        log.info("background: loaded %s on %s (%s, scheduler %s, safety checker %s)", self.identity, self.device,
                 self.dtype, type(pipe.scheduler).__name__, pipe.safety_checker is not None)

    def _edit_batch(self, images: list[Image.Image], prompts: list[str], seeds: list[int]) -> list[Image.Image | str]:
        """One pipeline call: square ``resolution`` inputs, per-image generators, outputs at the input sizes."""
        side = self.config.resolution
        inputs = [im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC) for im in images]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # CPU: same noise on every device
        with self._lock:
            result = self.pipe(prompt=prompts, image=inputs, num_inference_steps=self.config.steps,
                               guidance_scale=self.config.text_cfg, image_guidance_scale=self.config.image_cfg,
                               generator=generators, output_type="pil")
        flagged = result.nsfw_content_detected or [False] * len(images)
        return [FILTERED if bad else out.resize(im.size, Image.Resampling.BICUBIC)
                for out, im, bad in zip(result.images, images, flagged, strict=True)]

    def edit(self, images: list[Image.Image], backgrounds: list[str], alts: list[str],
             rows: list[Row]) -> list[Image.Image | str]:
        """Each image with its background turned from ``backgrounds[i]`` into ``alts[i]``.

        Returns:
            Per image, the edited RGB image at the input size, or the reason it was not edited
            (``"no background/alternative"``, ``"filtered by the safety checker"``).

        Raises:
            ValueError: the four lists differ in length.
        """
        # 1. Check inputs
        if not len(images) == len(backgrounds) == len(alts) == len(rows):
            raise ValueError(f"edit: images, backgrounds, alts and rows must have one entry per image, got "
                             f"{len(images)}, {len(backgrounds)}, {len(alts)}, {len(rows)}")
        # 2. Prompts; rows without both texts are not edited
        results: list[Image.Image | str] = [NO_TEXT] * len(images)
        todo = [i for i in range(len(images)) if (backgrounds[i] or "").strip() and (alts[i] or "").strip()]
        prompts = {i: self.template.format(background=backgrounds[i].strip(), alt=alts[i].strip()) for i in todo}
        # 3. Batches of ``batch_size``
        for start in range(0, len(todo), self.config.batch_size):
            chunk = todo[start : start + self.config.batch_size]
            seeds = [image_seed(self.config.seed, str(rows[i].get("image_id", i))) for i in chunk]
            edited = self._edit_batch([images[i] for i in chunk], [prompts[i] for i in chunk], seeds)
            for i, out in zip(chunk, edited):
                results[i] = out
        return results


_editors: dict[str, BackgroundEditor] = {}
_lock = threading.Lock()


def load_editor(config: BackgroundConfig) -> BackgroundEditor:
    """The InstructPix2Pix editor for this section, built once per worker process (same config, same object).

    Raises:
        ValueError: ``background.backend`` is not ``instruct-pix2pix``; see :class:`InstructPix2PixEditor`.
    """
    if config.backend != BACKEND:
        raise ValueError(f"background.backend={config.backend!r}: this loader builds {BACKEND!r} editors")
    key = config.model_dump_json(exclude={"bank"})
    with _lock:
        if key not in _editors:
            _editors[key] = InstructPix2PixEditor(config)
        return _editors[key]
