"""Inpainting backends of the ``remove`` stage: fill the pixels of a (dilated) object mask.

ASPIRE Sec. 2(4.a) (https://arxiv.org/abs/2308.10103) removes a foreground object by segmenting it and
inpainting the hole. Backends (``remove.inpaint``):

- ``lama``: LaMa (Suvorov et al., 2022, https://arxiv.org/abs/2109.07161) through ``simple-lama-inpainting``,
  whose TorchScript ``big-lama.pt`` is read from the ``LAMA_MODEL`` environment variable (never downloaded).
- ``opencv``: ``cv2.inpaint`` with Telea (2004) or Navier-Stokes (Bertalmio et al., 2001); no model.

Both implement :class:`tasks.vision.Inpainter`: RGB PIL images and boolean (H, W) masks in, images of the
input sizes out; unmasked pixels come back unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from aspire.lazy import resolve_device, torch
from aspire.config import RemoveConfig
from aspire.identity import weights_digest
from tasks.vision import Inpainter

log = logging.getLogger(__name__)

LAMA_ENV = "LAMA_MODEL"
LAMA_MODULO = 8  # LaMa's input sides must be multiples of 8 (its simple-lama wrapper pads to that)
OPENCV_RADIUS = 5  # pixels around a hole that cv2.inpaint considers
_OPENCV_FLAGS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def _check_pairs(images: list[Image.Image], masks: list[np.ndarray]) -> None:
    """Raise a ValueError unless every image has a boolean-able (H, W) mask of its own size."""
    if len(images) != len(masks):
        raise ValueError(f"masks: expected one per image, got {len(masks)} masks for {len(images)} images")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if mask.shape != (image.height, image.width):
            raise ValueError(f"masks[{i}]: shape {mask.shape} does not match image size (H, W) = "
                             f"{(image.height, image.width)}")


# -- identity ------------------------------------------------------------------------------------------------


def lama_model_path() -> Path:
    """The TorchScript file named by ``LAMA_MODEL``.

    Raises:
        ValueError: ``LAMA_MODEL`` unset, or not an existing file (checked before simple-lama could download).
    """
    value = os.environ.get(LAMA_ENV, "")
    if not value:
        raise ValueError(f"remove.inpaint='lama' needs the environment variable {LAMA_ENV} set to the LaMa "
                         "TorchScript file (big-lama.pt); it is not set (nothing is downloaded). Use "
                         "remove.inpaint='opencv' to inpaint without a model.")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{LAMA_ENV}={value!r}: no such file (expected the LaMa TorchScript file big-lama.pt)")
    return path


def inpainter_identity(config: RemoveConfig) -> str:
    """What the inpainted pixels depend on, without loading anything.

    ``opencv:<method>:r<radius>`` or ``lama:<file name>:<size>@<digest>``.

    Raises:
        ValueError: ``remove.inpaint='lama'`` with ``LAMA_MODEL`` unset or missing.
    """
    if config.inpaint == "opencv":
        return f"opencv:{config.opencv_method}:r{OPENCV_RADIUS}"
    path = lama_model_path()
    return f"lama:{path.name}:{path.stat().st_size}@{weights_digest(path)}"


# -- backends ------------------------------------------------------------------------------------------------


class OpenCVInpainter:
    """``cv2.inpaint`` (Telea or Navier-Stokes, ``remove.opencv_method``), one image at a time on the CPU."""

    def __init__(self, config: RemoveConfig) -> None:
        if config.opencv_method not in _OPENCV_FLAGS:
            raise ValueError(f"remove.opencv_method={config.opencv_method!r}: expected one of "
                             f"{', '.join(_OPENCV_FLAGS)}")
        self.flag = _OPENCV_FLAGS[config.opencv_method]
        self.identity = inpainter_identity(config)

    def inpaint(self, images: list[Image.Image], masks: list[np.ndarray]) -> list[Image.Image]:
        """Each image with its masked pixels filled from their surroundings (input sizes kept)."""
        _check_pairs(images, masks)
        out = []
        for image, mask in zip(images, masks):
            rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
            hole = mask.astype(bool).astype(np.uint8) * 255  # (H, W) uint8, 255 = fill
            out.append(Image.fromarray(cv2.inpaint(rgb, hole, OPENCV_RADIUS, self.flag)) if hole.any()
                       else image.convert("RGB"))
        return out


class LamaInpainter:
    """LaMa (https://arxiv.org/abs/2109.07161) from ``LAMA_MODEL``, batched over images of one padded size.

    simple-lama calls the TorchScript model one image at a time; here images whose sides round up to the same
    multiple of 8 run in one forward pass (at most ``remove.batch_size``), each padded exactly as simple-lama
    pads it (symmetric, to a multiple of 8), so an output does not depend on its batch mates.

    Raises:
        ValueError: ``LAMA_MODEL`` unset or missing (before simple-lama could try to download the model).
    """

    def __init__(self, config: RemoveConfig) -> None:
        path = lama_model_path()  # 1. validate first: SimpleLama() downloads when LAMA_MODEL is unset
        from simple_lama_inpainting import SimpleLama

        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size
        self.identity = inpainter_identity(config)
        self.model = SimpleLama(device=self.device).model  # TorchScript: (image, mask) -> image
        self._lock = threading.Lock()  # one forward at a time per worker: bounded GPU memory
        log.info("remove: loaded LaMa %s on %s", path, self.device)

    @staticmethod
    def _padded(array: np.ndarray) -> np.ndarray:
        """(C, H, W) padded symmetrically at the bottom/right to multiples of 8 (as simple-lama does)."""
        _, h, w = array.shape
        ph, pw = -h % LAMA_MODULO, -w % LAMA_MODULO
        return np.pad(array, ((0, 0), (0, ph), (0, pw)), mode="symmetric")

    def _forward(self, rgbs: list[np.ndarray], holes: list[np.ndarray]) -> list[np.ndarray]:
        """LaMa on same-padded-size images: (H, W, 3) uint8 + (H, W) bool -> (H, W, 3) uint8 predictions."""
        image = np.stack([self._padded(rgb.transpose(2, 0, 1).astype(np.float32) / 255) for rgb in rgbs])
        mask = np.stack([self._padded(hole[None].astype(np.float32)) for hole in holes])
        with self._lock, torch.inference_mode():
            pred = self.model(torch.from_numpy(image).to(self.device),  # (B, 3, H8, W8) float32 in [0, 1]
                              torch.from_numpy(mask).to(self.device))  # (B, 1, H8, W8) float32 0/1
        pred = (pred.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H8, W8, 3)
        return [p[: rgb.shape[0], : rgb.shape[1]] for p, rgb in zip(pred, rgbs)]  # crop the padding

    def inpaint(self, images: list[Image.Image], masks: list[np.ndarray]) -> list[Image.Image]:
        """Each image with its masked pixels filled by LaMa; unmasked pixels are kept exactly."""
        _check_pairs(images, masks)
        rgbs = [np.asarray(im.convert("RGB")) for im in images]
        holes = [m.astype(bool) for m in masks]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, rgb in enumerate(rgbs):
            if holes[i].any():
                h, w = rgb.shape[:2]
                groups.setdefault((h + -h % LAMA_MODULO, w + -w % LAMA_MODULO), []).append(i)
        out = list(rgbs)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, pred in zip(chunk, self._forward([rgbs[i] for i in chunk], [holes[i] for i in chunk])):
                    out[i] = np.where(holes[i][..., None], pred, rgbs[i])
        return [Image.fromarray(np.ascontiguousarray(a)) for a in out]


_inpainters: dict[str, Inpainter] = {}
_lock = threading.Lock()


def load_inpainter(config: RemoveConfig) -> Inpainter:
    """The configured inpainter, built once per worker process (same settings and weights, same object).

    Raises:
        ValueError: unknown ``remove.inpaint``; ``LAMA_MODEL`` unset or missing for ``lama``.
    """
    classes = {"lama": LamaInpainter, "opencv": OpenCVInpainter}
    if config.inpaint not in classes:
        raise ValueError(f"remove.inpaint={config.inpaint!r}: expected one of {', '.join(classes)}")
    key = f"{inpainter_identity(config)}|{config.device}|{config.batch_size}"
    with _lock:
        if key not in _inpainters:
            _inpainters[key] = classes[config.inpaint](config)
        return _inpainters[key]
