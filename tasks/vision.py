"""What the vision-editing stages share: detections, the backend protocols, mask helpers.

Backends of the ``remove`` stage (ASPIRE Sec. 2(4.a)) and the ``background`` stage (Sec. 2(4.b)) are small
classes chosen by name from config. Each has an ``identity`` (what its outputs depend on: backend, model id
or weights digest) and is built once per worker by its module's ``load_*`` function. Images are RGB PIL
images; masks are boolean numpy arrays of shape (H, W); boxes are ``[x0, y0, x1, y1]`` in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from aspire.manifest import Row

Box = list[float]  # [x0, y0, x1, y1] in pixels of the image given to the backend


@dataclass(frozen=True)
class Detection:
    """A grounded phrase: one box with its score (1.0 for annotations)."""

    phrase: str
    box: Box
    score: float


class Grounder(Protocol):
    identity: str

    def ground(self, image: Image.Image, phrases: list[str], row: Row) -> list[Detection]:
        """Boxes for every phrase, in ONE forward pass per image; phrases without a box get none."""


class Segmenter(Protocol):
    identity: str

    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        """One boolean (H, W) mask per box, with ONE image embedding per image for all its boxes."""


class Inpainter(Protocol):
    identity: str

    def inpaint(self, images: list[Image.Image], masks: list[np.ndarray]) -> list[Image.Image]:
        """Fill the masked pixels of each image (batched); outputs have the input sizes."""


class BackgroundEditor(Protocol):
    identity: str

    def edit(self, images: list[Image.Image], backgrounds: list[str], alts: list[str], rows: list[Row]) -> list[Image.Image | str]:
        """Each image with its background turned into ``alt``; a string in place of an image is the reason
        that image could not be edited."""


def dilate(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Grow a boolean mask by an elliptical kernel of ``kernel`` pixels (0: unchanged)."""
    if kernel <= 0 or not mask.any():
        return mask
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    return cv2.dilate(mask.astype(np.uint8), element) > 0


def box_mask(size: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean (H, W) mask of a box clipped to an image of ``size`` = (W, H)."""
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    mask[y0:y1, x0:x1] = x1 > x0 and y1 > y0
    return mask
