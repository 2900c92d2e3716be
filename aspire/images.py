"""Loading images as 8-bit RGB, and quarantining the ones that cannot be loaded.

:func:`load_rgb` decodes the whole file (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off, so a file cut short
is an error, not a grey bottom half), turns the image by its EXIF orientation and converts any mode (grayscale,
palette, RGBA, CMYK, 16-bit) to RGB.
:func:`check_images` runs it over manifest rows and returns the good rows and one quarantine record per bad
image with a human-readable reason.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aspire.manifest import Row

logger = logging.getLogger(__name__)

ORIENTATION = 0x0112  # EXIF tag
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_PIXELS = 64_000_000
"""Images with more pixels are quarantined ("image too large"): no classifier input needs them, and every epoch
would decode the whole file again (Pillow only warns up to ~179 MP). A 64-MP photo is 9,238 x 6,928."""


class ImageError(ValueError):
    """An image file cannot be loaded.

    Attributes:
        path: the file.
        reason: human-readable reason, e.g. ``missing file`` or ``truncated image: ...``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file completely and return it as an 8-bit RGB image.

    Args:
        path: image file.

    Returns:
        A new RGB image, independent of the (closed) file.

    Raises:
        ImageError: missing file, empty file, not an image, truncated or otherwise undecodable image.
    """
    with _open_decoded(Path(path)) as image:
        return to_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: turned by its EXIF orientation tag (phone photos), else unchanged."""
    if image.getexif().get(ORIENTATION, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def needs_rgb_copy(path: str | os.PathLike[str]) -> bool:
    """Whether readers other than :func:`load_rgb` would see other pixels in this file than it does.

    True for modes that torchvision's loader (``convert("RGB")``: 16-bit clipped, not scaled) and ``datasets``
    (the raw mode) read differently, and for an EXIF orientation that torchvision ignores and ``datasets``
    applies. Only the header is read.
    """
    with Image.open(path) as image:
        return image.mode not in ("RGB", "L") or image.getexif().get(ORIENTATION, 1) not in (0, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16/32-bit grayscale is scaled to 0..255, alpha is dropped)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(values / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def check_images(rows: list[Row]) -> tuple[list[Row], list[dict[str, str]]]:
    """Split rows into loadable images and quarantine records.

    Args:
        rows: manifest rows (``image_id``, ``path``).

    Returns:
        (rows whose image decodes, in order; ``{"image_id", "path", "reason"}`` for each of the others).
    """
    good: list[Row] = []
    quarantine: list[dict[str, str]] = []
    for row in rows:
        try:
            if row.get("path") is None:
                raise ImageError("", "missing file")
            with _open_decoded(Path(row["path"])):
                pass
        except ImageError as exc:
            quarantine.append({"image_id": str(row["image_id"]), "path": str(row.get("path")), "reason": exc.reason})
            logger.warning("quarantined %s (%s): %s", row["image_id"], row.get("path"), exc.reason)
            continue
        good.append(row)
    logger.info("checked %d images: %d good, %d quarantined", len(rows), len(good), len(quarantine))
    return good, quarantine


def _open_decoded(path: Path) -> Image.Image:
    """Open ``path`` and decode all of its pixels; the caller closes the returned image.

    Raises:
        ImageError: with the reason the file cannot be decoded.
    """
    if path.is_dir():
        raise ImageError(path, "a folder, not an image file")
    if not path.is_file():
        raise ImageError(path, "missing file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow warns above ~89 MP; MAX_PIXELS below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
        raise ImageError(path, f"not an image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large: {exc}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageError(path, f"image too large: {width} x {height} = {width * height / 1e6:.0f} MP, above "
                               f"{MAX_PIXELS / 1e6:.0f} MP (aspire.images.MAX_PIXELS); downscale it")
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        image.close()
        kind = "truncated image" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt image"
        raise ImageError(path, f"{kind}: {exc}") from None
    except Image.DecompressionBombError as exc:
        image.close()
        raise ImageError(path, f"image too large: {exc}") from None
    return image
