"""Grounders of the ``remove`` stage: text phrases to boxes (``remove.ground``).

ASPIRE Sec. 2(4.a) (https://arxiv.org/abs/2308.10103): "we first localize the object using Grounding DINO
(Liu et al., 2023c, https://arxiv.org/abs/2303.05499), which takes as input the text phrase of f ... and
outputs a bounding box". Backends:

- ``groundingdino``: the reference implementation (groundingdino-py), a python config file + ``.pth`` checkpoint.
- ``hf-grounding-dino``: transformers ``AutoModelForZeroShotObjectDetection`` (hub id or local folder).
- ``annotations``: the manifest's ``boxes`` column (datasets that ship boxes; no model).

The model backends ground each phrase with its own prompt and forward pass by default (``remove.grounding:
per-phrase``, ASPIRE's Algorithm 1). ``joint`` grounds ALL phrases of an image in ONE forward pass: the prompt is
the phrases joined by "." and each box is assigned to the phrase whose tokens it scores highest (its text span in
the prompt, found from the token ids; the decoded label text is not used, it mixes phrases and special tokens at
low thresholds). Per phrase is the same code with one phrase per prompt. ``forward_calls`` counts the passes.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
from pathlib import Path

from PIL import Image

from aspire.lazy import resolve_device, torch
from aspire.config import RemoveConfig
from aspire.identity import expand_ref, model_identity, weights_digest
from aspire.manifest import Row, digest
from aspire.phrases import phrase_root
from tasks.vision import Box, Detection, Grounder

log = logging.getLogger(__name__)

BACKENDS = ("groundingdino", "hf-grounding-dino", "annotations")
# -- identity ------------------------------------------------------------------------------------------------


def _existing_file(value: Path | None, key: str) -> Path:
    """``remove.<key>`` as an existing file, else a ValueError naming the key."""
    if value is None:
        raise ValueError(f"remove.{key} is not set: remove.ground='groundingdino' needs it")
    path = Path(expand_ref(value))
    if not path.is_file():
        raise ValueError(f"remove.{key}={str(value)!r}: no such file")
    return path


def grounder_identity(config: RemoveConfig) -> str:
    """What the grounder's boxes depend on, without loading a model: backend, model (hub id, or local files'
    digest), thresholds. ``annotations`` for the boxes column.

    Raises:
        ValueError: unknown ``remove.ground``; missing groundingdino config/checkpoint (naming the key).
    """
    if config.ground not in BACKENDS:
        raise ValueError(f"remove.ground={config.ground!r}: expected one of {', '.join(BACKENDS)}")
    if config.ground == "annotations":
        return "annotations"
    thresholds = f"box={config.box_threshold:g},text={config.text_threshold:g},{config.grounding}"
    if config.ground == "hf-grounding-dino":
        return f"hf-grounding-dino:{model_identity(config.ground_model)}:{thresholds}"
    cfg = _existing_file(config.groundingdino_config, "groundingdino_config")
    checkpoint = weights_digest(_existing_file(config.groundingdino_checkpoint, "groundingdino_checkpoint"))
    return (f"groundingdino:{digest([cfg.read_text(), checkpoint])}:{model_identity(config.text_encoder)}:"
            f"{thresholds}")


# -- shared helpers ------------------------------------------------------------------------------------------


def ground_phrases(ground_prompt, image: Image.Image, phrases: list[str], mode: str) -> list[Detection]:
    """``ground_prompt(image, phrases)`` once for all phrases (``joint``), or once per distinct phrase
    (``per-phrase``: each phrase alone in its prompt, the boxes it gets are its own)."""
    if mode == "joint":
        return ground_prompt(image, phrases)
    return [d for phrase in dict.fromkeys(phrases) for d in ground_prompt(image, [phrase])]


def prompt_phrases(phrases: list[str]) -> list[str]:
    """Lowercase phrases without the separators "." and "?", empty ones dropped, duplicates once."""
    out: list[str] = []
    for phrase in phrases:
        clean = " ".join(re.findall(r"[^\s.?]+", phrase.lower()))
        if clean and clean not in out:
            out.append(clean)
    return out


def phrase_spans(input_ids: list[int], separators: set[int], count: int) -> list[list[int]]:
    """Token positions of each phrase in a tokenised prompt: the runs between separator tokens
    ([CLS], [SEP], ".", padding). At most ``count`` (fewer when the model truncated the prompt)."""
    spans: list[list[int]] = []
    current: list[int] = []
    for position, token in enumerate(input_ids):
        if token in separators:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(position)
    if current:
        spans.append(current)
    return spans[:count]


def assign_boxes(probs: torch.Tensor, boxes: list[Box], spans: list[list[int]], prompts: list[str],
                 phrases: list[str], size: tuple[int, int], text_threshold: float) -> list[Detection]:
    """Detections for the kept boxes: each goes to the phrase whose tokens it scores highest when that score
    passes ``text_threshold`` (else it is dropped); its score is the box's best token probability.

    Args:
        probs: (N, T) token probabilities of the N kept boxes.
        boxes: N boxes ``[x0, y0, x1, y1]`` in pixels (clipped here to ``size`` = (W, H)).
        spans: token positions of ``prompts[k]`` (see :func:`phrase_spans`).
        phrases: the caller's phrases; a detection names every phrase whose prompt text it matched.
    """
    if not boxes:
        return []
    width, height = size
    spans = [s for s in ([p for p in span if p < probs.shape[1]] for span in spans) if s]  # truncated: the last
    if not spans:
        return []
    per_phrase = torch.stack([probs[:, span].max(dim=1).values for span in spans], dim=1)  # (N, P)
    best_prob, best = per_phrase.max(dim=1)
    scores = probs.max(dim=1).values
    by_prompt = {p: [q for q in phrases if prompt_phrases([q]) == [p]] for p in prompts}
    out: list[Detection] = []
    for box, k, prob, score in zip(boxes, best.tolist(), best_prob.tolist(), scores.tolist()):
        if prob <= text_threshold:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                   min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        out += [Detection(phrase, clipped, float(score)) for phrase in by_prompt[prompts[k]]]
    unmatched = int((best_prob <= text_threshold).sum())
    if unmatched:
        log.debug("grounding: %d of %d boxes match no phrase above text_threshold=%g; dropped", unmatched,
                  len(boxes), text_threshold)
    return sorted(out, key=lambda d: -d.score)


# -- annotations ---------------------------------------------------------------------------------------------


class AnnotationsGrounder:
    """The manifest's ``boxes`` column: a box belongs to a phrase when all the root words of the box's phrase
    are among the phrase's root words ("sled" matches "orange sled" and "two sleds"). Score 1.0."""

    identity = "annotations"

    def ground(self, image: Image.Image, phrases: list[str], row: Row) -> list[Detection]:
        annotations = row.get("boxes") or []
        if not annotations or not phrases:
            return []
        sx, sy = self._scale(image, row)
        roots = {phrase: set(phrase_root(phrase).split()) for phrase in phrases}
        out = []
        for annotation in annotations:
            words = set(phrase_root(annotation["phrase"]).split())
            x0, y0, x1, y1 = (float(v) for v in annotation["box"])
            box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
            out += [Detection(p, box, 1.0) for p in phrases if words and words <= roots[p]]
        return out

    @staticmethod
    def _scale(image: Image.Image, row: Row) -> tuple[float, float]:
        """(sx, sy) from the original image (header only) to ``image``; (1, 1) when the file is unknown."""
        path = row.get("path")
        if not path or not Path(path).is_file():
            return 1.0, 1.0
        with Image.open(path) as original:  # reads the header, not the pixels
            width, height = original.size
        return image.width / width, image.height / height


# -- model backends ------------------------------------------------------------------------------------------


class HFGroundingDino:
    """Grounding DINO through transformers (``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``)."""

    def __init__(self, config: RemoveConfig) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.config = config
        self.device = resolve_device(config.device)
        ref = expand_ref(config.ground_model)
        if (ref.startswith(("/", ".")) or Path(ref).exists()) and not Path(ref).is_dir():
            raise ValueError(f"remove.ground_model={config.ground_model!r}: no such folder (expected a local "
                             "model folder or a hub id)")
        self.identity = grounder_identity(config)
        try:
            self.processor = AutoProcessor.from_pretrained(ref)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(ref)
        except (OSError, ValueError) as exc:
            raise ValueError(f"remove.ground_model={config.ground_model!r}: cannot load a Grounding DINO "
                             f"processor and model ({type(exc).__name__}: {exc})") from exc
        self.model = model.to(self.device).eval()
        size = dict(self.processor.image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", config.ground_size), ("longest_edge", config.ground_max_size)) if v})
        self.processor.image_processor.size = size
        tokenizer = self.processor.tokenizer
        self._separators = {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                        tokenizer.convert_tokens_to_ids(".")) if i is not None}
        self.forward_calls = 0
        self._lock = threading.Lock()
        log.info("grounding: loaded %s on %s", self.identity, self.device)

    def ground(self, image: Image.Image, phrases: list[str], row: Row) -> list[Detection]:
        """Boxes for ``phrases`` in ``image`` (``row`` is not used): one forward per phrase, or one for all."""
        return ground_phrases(self._ground, image, phrases, self.config.grounding)

    def _ground(self, image: Image.Image, phrases: list[str]) -> list[Detection]:
        # 1. Prompt "phrase one. phrase two." for all phrases at once
        prompts = prompt_phrases(phrases)
        if not prompts:
            return []
        inputs = self.processor(images=image.convert("RGB"), text=". ".join(prompts) + ".", return_tensors="pt")
        inputs = inputs.to(self.device)
        # 2. One forward
        with self._lock, torch.inference_mode():
            outputs = self.model(**inputs)
            self.forward_calls += 1
        # 3. Boxes above box_threshold in pixels, and the token probabilities of the same boxes
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold, target_sizes=[(image.height, image.width)])[0]
        probs = outputs.logits[0].sigmoid().float().cpu()  # (Q, max_text_len)
        probs = probs[probs.max(dim=1).values > self.config.box_threshold]  # the same boxes, same order
        if len(probs) != len(result["boxes"]):
            raise RuntimeError(f"grounding: post-processing kept {len(result['boxes'])} boxes, expected {len(probs)}")
        # 4. Boxes to phrases by token positions
        spans = phrase_spans(inputs["input_ids"][0].tolist(), self._separators, len(prompts))
        return assign_boxes(probs, result["boxes"].cpu().tolist(), spans, prompts, phrases, image.size,
                            self.config.text_threshold)


REFERENCE_SIZE = (800, 1333)  # groundingdino-py's inference resize: shorter side, longer side at most


class GroundingDinoPy:
    """Grounding DINO's reference implementation (groundingdino-py): config file + checkpoint.

    The image transform is the package's ``load_image`` one, on a PIL image: shorter side to
    ``remove.ground_size`` (longer side at most ``remove.ground_max_size``), ImageNet normalisation. The
    reference size is 800 / 1333; tests use smaller ones (>= 128 px: smaller fails in GroupNorm).
    """

    def __init__(self, config: RemoveConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.identity = grounder_identity(config)  # also checks both files exist
        self.model = self._load(config).to(self.device).eval()
        tokenizer = self.model.tokenizer
        self._separators = {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                        tokenizer.convert_tokens_to_ids(".")) if i is not None}
        self.forward_calls = 0
        self._lock = threading.Lock()
        log.info("grounding: loaded %s on %s", self.identity, self.device)

    @staticmethod
    def _load(config: RemoveConfig) -> torch.nn.Module:
        """Read the checkpoint, build the model from the config file with ``text_encoder_type`` =
        ``remove.text_encoder``, load the checkpoint's ``model`` state dict (non-strict, as the reference loader)."""
        from groundingdino.models import build_model
        from groundingdino.util.misc import clean_state_dict
        from groundingdino.util.slconfig import SLConfig

        cfg_path = _existing_file(config.groundingdino_config, "groundingdino_config")
        ckpt_path = _existing_file(config.groundingdino_checkpoint, "groundingdino_checkpoint")
        encoder = expand_ref(config.text_encoder)
        if not Path(encoder).is_dir() and encoder != "bert-base-uncased":
            raise ValueError(f"remove.text_encoder={config.text_encoder!r}: expected a local BERT folder or "
                             "'bert-base-uncased' (groundingdino-py supports no other hub id)")
        try:
            args = SLConfig.fromfile(str(cfg_path))
        except Exception as exc:
            raise ValueError(f"remove.groundingdino_config={str(cfg_path)!r}: not a groundingdino config "
                             f"({type(exc).__name__}: {exc})") from exc
        try:  # before the (slow) build: a bad file fails fast; args may hold a Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            state = checkpoint["model"] if "model" in checkpoint else checkpoint
        except Exception as exc:
            raise ValueError(f"remove.groundingdino_checkpoint={str(ckpt_path)!r}: not a groundingdino "
                             f"checkpoint ({type(exc).__name__}: {exc})") from exc
        args.text_encoder_type = encoder
        args.device = str(resolve_device(config.device))
        try:
            model = build_model(args)
        except OSError as exc:
            raise ValueError(f"remove.text_encoder={config.text_encoder!r}: cannot load the BERT text encoder "
                             f"({exc})") from exc
        missing, unexpected = model.load_state_dict(clean_state_dict(state), strict=False)
        if missing or unexpected:
            log.warning("grounding: checkpoint %s: %d missing and %d unexpected keys (e.g. %s)", ckpt_path,
                        len(missing), len(unexpected), (list(missing) + list(unexpected))[:3])
        return model

    def transform(self, image: Image.Image) -> torch.Tensor:
        """(3, H', W') float32, normalised; the resize rule of groundingdino's ``T.RandomResize([size], max)``."""
        import torchvision.transforms.functional as F

        width, height = image.size
        size, max_size = self.config.ground_size or REFERENCE_SIZE[0], self.config.ground_max_size or REFERENCE_SIZE[1]
        short, long = min(width, height), max(width, height)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
        if short != size:
            width, height = (size, int(size * height / width)) if width < height else (int(size * width / height), size)
        tensor = F.to_tensor(F.resize(image.convert("RGB"), [height, width]))
        return F.normalize(tensor, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    def ground(self, image: Image.Image, phrases: list[str], row: Row) -> list[Detection]:
        """Boxes for ``phrases`` in ``image`` (``row`` is not used): one forward per phrase, or one for all."""
        return ground_phrases(self._ground, image, phrases, self.config.grounding)

    def _ground(self, image: Image.Image, phrases: list[str]) -> list[Detection]:
        # 1. Caption "a . b . c ." for all phrases at once
        prompts = prompt_phrases(phrases)
        if not prompts:
            return []
        caption = " . ".join(prompts) + " ."
        pixels = self.transform(image).to(self.device)  # (3, H', W')
        # 2. One forward
        with self._lock, torch.inference_mode():
            outputs = self.model(pixels[None], captions=[caption])
            self.forward_calls += 1
        # 3. Boxes above box_threshold: normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1)
        probs = outputs["pred_logits"][0].sigmoid().float().cpu()  # (Q, 256)
        boxes = outputs["pred_boxes"][0].float().cpu()  # (Q, 4)
        keep = probs.max(dim=1).values > self.config.box_threshold
        probs, boxes = probs[keep], boxes[keep] * torch.tensor([image.width, image.height] * 2)
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
        # 4. Boxes to phrases by token positions
        input_ids = self.model.tokenizer(caption)["input_ids"]
        spans = phrase_spans(input_ids, self._separators, len(prompts))
        return assign_boxes(probs, xyxy.tolist(), spans, prompts, phrases, image.size, self.config.text_threshold)


# -- loading -------------------------------------------------------------------------------------------------

_GROUND_FIELDS = ("ground", "grounding", "ground_model", "groundingdino_config", "groundingdino_checkpoint", "text_encoder",
                  "ground_size", "ground_max_size", "box_threshold", "text_threshold", "device")
_grounders: dict[str, Grounder] = {}
_lock = threading.Lock()


def load_grounder(config: RemoveConfig) -> Grounder:
    """The configured grounder, built once per worker process (same grounding settings, same object).

    Raises:
        ValueError: unknown ``remove.ground``; a model path that does not exist or does not load (naming the key).
    """
    classes = {"groundingdino": GroundingDinoPy, "hf-grounding-dino": HFGroundingDino,
               "annotations": lambda _: AnnotationsGrounder()}
    if config.ground not in classes:
        raise ValueError(f"remove.ground={config.ground!r}: expected one of {', '.join(classes)}")
    key = config.model_dump_json(include=set(_GROUND_FIELDS))
    with _lock:
        if key not in _grounders:
            _grounders[key] = classes[config.ground](config)
        return _grounders[key]
