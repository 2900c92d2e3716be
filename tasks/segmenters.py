"""Segmenters of the ``remove`` stage: one boolean mask per grounded box (ASPIRE Sec. 2(4.a)).

ASPIRE (https://arxiv.org/abs/2308.10103, Sec. 2(4.a)) grounds each foreground phrase to a box and segments it
with SAM before inpainting. Backends (``remove.segment``):

- ``sam``: segment-anything (Kirillov et al., 2023, https://arxiv.org/abs/2304.02643), ``SamPredictor`` with a
  checkpoint file (``remove.sam_checkpoint``, ``remove.sam_model_type``).
- ``hf-sam``: transformers ``SamModel`` + ``SamProcessor`` (``remove.hf_sam_model``: hub id or local folder).
- ``box``: the box itself (no model).
- ``grabcut``: OpenCV GrabCut (Rother et al., 2004, https://doi.org/10.1145/1015706.1015720) started from the box.

The model backends run the image encoder ONCE per image and decode all its boxes in one batched call; they
count image-encoder forward passes in ``encoder_calls`` (a forward hook; ``bench/sam_calls.py`` reports it).
"""

from __future__ import annotations

import logging
import pickle
import threading
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from aspire.lazy import resolve_device, torch
from aspire.config import RemoveConfig
from aspire.identity import expand_ref, model_identity, weights_digest
from tasks.vision import Box, Segmenter, box_mask

log = logging.getLogger(__name__)

SEGMENTERS = ("sam", "hf-sam", "box", "grabcut")
GRABCUT_ITERATIONS = 1  # from the ring-colour prior one round (colour models, graph cut) is best: on strong textures
# each further round lets the foreground model learn more of the background (BENCHMARKS.md, 2026-12-08)
GRABCUT_MIN_SIDE = 4  # px: smaller boxes have too few pixels for GrabCut's colour models, the box is kept
RING_COLOURS = 5  # k-means centres of the colours around the box (GrabCut's own colour models have 5 components)
RING_QUANTILE = 95  # a box pixel nearer to a ring colour than this percentile of the ring's own distances is "like the ring"
def _check_boxes(boxes: Sequence[Box]) -> None:
    """Raises ValueError naming the first box that is not ``[x0, y0, x1, y1]`` with x0 <= x1 and y0 <= y1."""
    for i, box in enumerate(boxes):
        try:
            values = np.asarray(box, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            values = np.full(1, np.nan)
        if values.size != 4 or not np.isfinite(values).all() or values[2] < values[0] or values[3] < values[1]:
            raise ValueError(f"boxes[{i}]={box!r}: expected [x0, y0, x1, y1] in pixels, finite, x0 <= x1, y0 <= y1")


# -- identity ------------------------------------------------------------------------------------------------


def _checkpoint(config: RemoveConfig) -> Path:
    """``remove.sam_checkpoint`` as an existing file; raises ValueError naming the key otherwise."""
    if config.sam_checkpoint is None:
        raise ValueError("remove.sam_checkpoint=None: segment='sam' needs a segment-anything checkpoint file "
                         "(e.g. sam_vit_h_4b8939.pth)")
    path = Path(config.sam_checkpoint).expanduser()
    if not path.is_file():
        raise ValueError(f"remove.sam_checkpoint={str(config.sam_checkpoint)!r}: no such file (expected a "
                         "segment-anything checkpoint, e.g. sam_vit_h_4b8939.pth)")
    return path


def _hf_ref(config: RemoveConfig) -> str:
    """``remove.hf_sam_model`` as given to ``from_pretrained``; a path-like value must be an existing folder."""
    ref = expand_ref(config.hf_sam_model)
    if (ref.startswith(("/", ".")) or Path(ref).exists()) and not Path(ref).is_dir():
        raise ValueError(f"remove.hf_sam_model={config.hf_sam_model!r}: no such folder (expected a local model "
                         "folder or a hub id)")
    return ref


def segmenter_identity(config: RemoveConfig) -> str:
    """What masks depend on, without loading a model.

    ``box``; ``grabcut:iterations=1,seed=0,init=ring-colours``; ``sam:<model type>:<file name>@<digest of size, first and last
    MiB>`` (moving the checkpoint keeps the identity, replacing it changes it); ``hf-sam:<hub id>`` or
    ``hf-sam:<absolute folder>@<digest of its files>``.

    Raises:
        ValueError: unknown ``remove.segment``; missing ``remove.sam_checkpoint`` or ``remove.hf_sam_model`` folder.
    """
    if config.segment == "box":
        return BoxSegmenter.identity
    if config.segment == "grabcut":
        return GrabCutSegmenter().identity
    if config.segment == "sam":
        path = _checkpoint(config)
        return f"sam:{config.sam_model_type}:{path.name}@{weights_digest(path)}"
    if config.segment == "hf-sam":
        return f"hf-sam:{model_identity(_hf_ref(config))}"
    raise ValueError(f"remove.segment={config.segment!r}: expected one of {', '.join(SEGMENTERS)}")


# -- model-free backends -------------------------------------------------------------------------------------


class BoxSegmenter:
    """The box itself as the mask (no model): a fast baseline and the fallback of the other backends."""

    identity = "box"

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        _check_boxes(boxes)
        return [box_mask(image.size, box) for box in boxes]


class GrabCutSegmenter:
    """OpenCV GrabCut (Rother et al., 2004, https://doi.org/10.1145/1015706.1015720) started from the box.

    GrabCut runs on the box plus a margin of half its size (at least 16 px) on each side, whose pixels outside
    the box (the *ring*) are background. Inside the box it starts from a colour prior instead of "everything is
    foreground": pixels whose colour the ring also shows (nearer to one of the ring's k-means colours than 95% of
    the ring's own pixels are) start as probable background, the others as probable foreground. An object is
    what differs from its surroundings; started from the whole box, GrabCut's foreground model also learns the
    background's colours and, on high-contrast textures (a checkerboard, stripes), keeps much of them. A box
    whose pixels are all like the ring (a camouflaged object) starts from the whole box as plain GrabCut does.
    Boxes that GrabCut cannot handle (tiny, covering the whole image) or for which it returns an empty mask fall
    back to the box mask, with a log line. OpenCV's RNG is seeded with ``seed`` before each box, so masks are
    deterministic.

    Args:
        iterations: GrabCut iterations per box.
        seed: seed of OpenCV's RNG (the k-means of the ring and of GrabCut's colour models).
    """

    def __init__(self, iterations: int = GRABCUT_ITERATIONS, seed: int = 0) -> None:
        if iterations < 1:
            raise ValueError(f"iterations={iterations}: expected >= 1")
        self.iterations = iterations
        self.seed = seed
        self.identity = f"grabcut:iterations={iterations},seed={seed},init=ring-colours"

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        _check_boxes(boxes)
        bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)  # (H, W, 3) uint8
        return [self._segment_box(bgr, box) for box in boxes]

    def _segment_box(self, bgr: np.ndarray, box: Box) -> np.ndarray:
        height, width = bgr.shape[:2]
        fallback = box_mask((width, height), box)
        # 1. The box in whole pixels, clipped; tiny boxes keep the box mask.
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        if x1 - x0 < GRABCUT_MIN_SIDE or y1 - y0 < GRABCUT_MIN_SIDE:
            log.info("grabcut: box %s smaller than %d px, keeping the box mask", box, GRABCUT_MIN_SIDE)
            return fallback
        # 2. Crop to the box plus a margin: local background model, and cost independent of the image size.
        mx, my = max(16, (x1 - x0) // 2), max(16, (y1 - y0) // 2)
        cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
        crop = np.ascontiguousarray(bgr[cy0:cy1, cx0:cx1])
        in_box = np.zeros(crop.shape[:2], bool)
        in_box[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] = True
        # 3. GrabCut from the ring's colour prior (or from the box), seeded; failures and empty results keep the box.
        cv2.setRNGSeed(self.seed)
        labels = self._initial_labels(crop, in_box)
        rect, mode = None, cv2.GC_INIT_WITH_MASK
        if labels is None:
            labels, mode = np.zeros(crop.shape[:2], np.uint8), cv2.GC_INIT_WITH_RECT
            rect = (x0 - cx0, y0 - cy0, x1 - x0, y1 - y0)
        try:
            cv2.grabCut(crop, labels, rect, np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64),
                        self.iterations, mode)
        except cv2.error as exc:
            log.info("grabcut: failed on box %s (%s), keeping the box mask", box, str(exc).strip().splitlines()[-1])
            return fallback
        foreground = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)) & in_box
        if not foreground.any():
            log.info("grabcut: empty mask for box %s, keeping the box mask", box)
            return fallback
        mask = np.zeros((height, width), dtype=bool)
        mask[cy0:cy1, cx0:cx1] = foreground
        return mask

    @staticmethod
    def _initial_labels(crop: np.ndarray, in_box: np.ndarray) -> np.ndarray | None:
        """GrabCut's starting labels from the ring's colours (see the class), or None to start from the box: no
        ring (the box covers the crop), fewer ring pixels than colours, or no box pixel unlike the ring."""
        ring = crop[~in_box].astype(np.float32)  # (pixels, 3)
        if len(ring) < 4 * RING_COLOURS:
            return None
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
        _, _, centres = cv2.kmeans(ring, RING_COLOURS, None, criteria, 2, cv2.KMEANS_PP_CENTERS)

        def distance(pixels: np.ndarray) -> np.ndarray:  # to the nearest ring colour
            return np.sqrt(((pixels[:, None, :] - centres[None]) ** 2).sum(-1)).min(1)

        like_ring = distance(crop[in_box].astype(np.float32)) <= np.percentile(distance(ring), RING_QUANTILE)
        if like_ring.all():
            return None
        labels = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        labels[in_box] = np.where(like_ring, cv2.GC_PR_BGD, cv2.GC_PR_FGD)
        return labels


# -- SAM backends --------------------------------------------------------------------------------------------


class _EncoderCounter:
    """Counts forward passes of an image encoder (``encoder_calls``) with a forward hook."""

    encoder_calls: int

    def _watch_encoder(self, encoder: torch.nn.Module) -> None:
        self.encoder_calls = 0

        def count(module: torch.nn.Module, args: tuple, output: object) -> None:
            self.encoder_calls += 1

        encoder.register_forward_hook(count)


class SamSegmenter(_EncoderCounter):
    """segment-anything (https://arxiv.org/abs/2304.02643): one ``set_image`` per image, then all of its boxes
    in one batched ``predict_torch`` call with ``multimask_output=False`` (box prompts are unambiguous).

    Raises:
        ValueError: missing ``remove.sam_checkpoint``; unknown ``remove.sam_model_type``; a checkpoint that is not
            a state dict of that architecture.
    """

    def __init__(self, config: RemoveConfig) -> None:
        from segment_anything import SamPredictor, sam_model_registry

        self.identity = segmenter_identity(config)
        self.device = resolve_device(config.device)
        if config.sam_model_type not in sam_model_registry:
            raise ValueError(f"remove.sam_model_type={config.sam_model_type!r}: expected one of "
                             f"{', '.join(sam_model_registry)}")
        # The registry's own checkpoint= path calls torch.load without map_location: load here instead.
        model = sam_model_registry[config.sam_model_type](checkpoint=None)
        path = _checkpoint(config)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
            raise ValueError(f"remove.sam_checkpoint={str(config.sam_checkpoint)!r}: not a segment-anything "
                             f"{config.sam_model_type!r} state dict (remove.sam_model_type) "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        self.model = model.to(self.device).eval()
        self.predictor = SamPredictor(self.model)
        self._watch_encoder(self.model.image_encoder)
        self._lock = threading.Lock()  # the predictor holds one image's features: one image at a time
        log.info("segment: loaded %s on %s", self.identity, self.device)

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        """One boolean (H, W) mask per box; the image encoder runs once (none for no boxes)."""
        _check_boxes(boxes)
        if not boxes:
            return []
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        with self._lock, torch.inference_mode():
            self.predictor.set_image(rgb)  # the one image-encoder pass
            prompts = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device)  # (N, 4) xyxy px
            prompts = self.predictor.transform.apply_boxes_torch(prompts, rgb.shape[:2])  # to the encoder's frame
            masks, _, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
            self.predictor.reset_image()  # free the features
        return list(masks[:, 0].cpu().numpy())  # N x (H, W) bool


class HFSamSegmenter(_EncoderCounter):
    """transformers SAM: ``get_image_embeddings`` once per image, then all boxes in one call with
    ``image_embeddings``; masks are post-processed to the image size, the best-IoU mask of each box kept.

    Raises:
        ValueError: ``remove.hf_sam_model`` is neither a local folder nor a loadable hub id.
    """

    def __init__(self, config: RemoveConfig) -> None:
        from transformers import SamModel, SamProcessor

        self.identity = segmenter_identity(config)
        self.device = resolve_device(config.device)
        ref = _hf_ref(config)
        try:
            self.processor = SamProcessor.from_pretrained(ref)
            model = SamModel.from_pretrained(ref)
        except (OSError, ValueError) as exc:
            raise ValueError(f"remove.hf_sam_model={config.hf_sam_model!r}: cannot load SamModel/SamProcessor "
                             f"as a local folder or hub id ({type(exc).__name__}: {exc})") from exc
        self.model = model.to(self.device).eval()
        self._watch_encoder(self.model.vision_encoder)
        self._lock = threading.Lock()  # one image at a time per worker: bounded GPU memory
        log.info("segment: loaded %s on %s", self.identity, self.device)

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        """One boolean (H, W) mask per box; the vision encoder runs once (none for no boxes)."""
        _check_boxes(boxes)
        if not boxes:
            return []
        prompts = [[[float(v) for v in box] for box in boxes]]  # (1 image, N boxes, 4)
        inputs = self.processor(images=image.convert("RGB"), input_boxes=prompts, return_tensors="pt")
        with self._lock, torch.inference_mode():
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))  # (1, C, h, w)
            out = self.model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].to(self.device),
                             multimask_output=False)  # pred_masks (1, N, K, 256, 256), iou_scores (1, N, K)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # (N, K, H, W) bool
        best = out.iou_scores[0].argmax(dim=-1).cpu()  # (N,)
        return [masks[i, int(best[i])].numpy() for i in range(len(boxes))]


# -- loading -------------------------------------------------------------------------------------------------

_segmenters: dict[tuple[str, str], Segmenter] = {}
_lock = threading.Lock()


def load_segmenter(config: RemoveConfig) -> Segmenter:
    """The configured segmenter, built once per worker process (same identity and device, same object).

    Raises:
        ValueError: unknown ``remove.segment``; a missing or wrong ``remove.sam_checkpoint`` /
            ``remove.sam_model_type``; an unloadable ``remove.hf_sam_model`` (each naming the value).
    """
    key = (segmenter_identity(config), config.device)  # validates the config before anything loads
    builders = {"sam": SamSegmenter, "hf-sam": HFSamSegmenter, "box": lambda _: BoxSegmenter(),
                "grabcut": lambda _: GrabCutSegmenter()}
    with _lock:
        if key not in _segmenters:
            _segmenters[key] = builders[config.segment](config)
        return _segmenters[key]
