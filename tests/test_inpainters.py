"""Inpainting backends on CPU: OpenCV, and LaMa with a tiny TorchScript stand-in for big-lama.pt."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import RemoveConfig
from tasks.inpainters import LamaInpainter, OpenCVInpainter, inpainter_identity, load_inpainter

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
COLOUR = (40, 120, 200)


def flat(width: int, height: int, colour=COLOUR) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def square_mask(width: int, height: int, x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


class HalfGrey(torch.nn.Module):
    """LaMa's call signature: (image [B,3,H,W] in 0..1, mask [B,1,H,W] 0/1) -> [B,3,H,W]; fills holes with 0.5.

    Like big-lama it insists on sides that are multiples of 8 and returns the padded size."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert image.shape[2] % 8 == 0 and image.shape[3] % 8 == 0
        return image * (1 - mask) + 0.5 * mask


@pytest.fixture
def lama_file(tmp_path, monkeypatch):
    path = tmp_path / "big-lama.pt"
    torch.jit.script(HalfGrey()).save(str(path))
    monkeypatch.setenv("LAMA_MODEL", str(path))
    return path


def test_opencv_fills_a_flat_image_and_keeps_sizes():
    inpainter = load_inpainter(RemoveConfig(inpaint="opencv"))
    assert isinstance(inpainter, OpenCVInpainter) and inpainter.identity == "opencv:telea:r5"
    images = [flat(61, 90), flat(90, 61)]
    images[0].paste((255, 0, 0), (20, 30, 40, 50))  # a red object to remove
    masks = [square_mask(61, 90, 18, 28, 24), np.zeros((61, 90), dtype=bool)]
    out = load_inpainter(RemoveConfig(inpaint="opencv", opencv_method="ns")).inpaint(images, masks)
    assert [im.size for im in out] == [(61, 90), (90, 61)]
    filled = np.asarray(out[0]).astype(int)[masks[0]]
    assert np.abs(filled - COLOUR).max() <= 3  # the red square is gone, filled with the flat colour
    assert np.array_equal(np.asarray(out[1]), np.asarray(images[1]))


def test_mask_of_another_size_is_rejected():
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        OpenCVInpainter(RemoveConfig(inpaint="opencv")).inpaint([flat(10, 12)], [np.zeros((10, 12), bool)])


def test_lama_batches_mixed_sizes_and_crops(lama_file):
    config = RemoveConfig(inpaint="lama", device="cpu", batch_size=2)
    inpainter = load_inpainter(config)
    assert isinstance(inpainter, LamaInpainter) and load_inpainter(config) is inpainter
    assert inpainter.identity.startswith("lama:big-lama.pt:")
    sizes = [(61, 90), (62, 93), (90, 61), (64, 64), (61, 90)]  # (61, 90) and (62, 93) share a padded size
    images = [flat(w, h) for w, h in sizes]
    masks = [square_mask(w, h, 5, 7, 11) for w, h in sizes]
    masks[3][:] = False  # no hole: returned as is
    out = inpainter.inpaint(images, masks)
    assert [im.size for im in out] == sizes
    for image, mask, result in zip(images, masks, out):
        before, after = np.asarray(image), np.asarray(result)
        assert np.array_equal(after[~mask], before[~mask])  # unmasked pixels kept exactly
        assert (after[mask] == 128).all()  # masked pixels are the model's 0.5 grey
    # an output does not depend on its batch mates
    alone = inpainter.inpaint(images[1:2], masks[1:2])[0]
    assert np.array_equal(np.asarray(alone), np.asarray(out[1]))


def test_lama_groups_by_padded_size(lama_file):
    inpainter = LamaInpainter(RemoveConfig(inpaint="lama", device="cpu", batch_size=2))  # not the shared one
    model, shapes = inpainter.model, []
    inpainter.model = lambda image, mask: shapes.append(tuple(image.shape)) or model(image, mask)
    sizes = [(61, 90), (62, 93), (90, 61), (61, 90), (64, 64)]
    inpainter.inpaint([flat(w, h) for w, h in sizes], [square_mask(w, h, 1, 1, 5) for w, h in sizes])
    assert sorted(shapes) == sorted([(2, 3, 96, 64), (1, 3, 96, 64), (1, 3, 64, 96), (1, 3, 64, 64)])


def test_lama_identity_follows_the_weights(lama_file, tmp_path, monkeypatch):
    config = RemoveConfig(inpaint="lama")
    first = inpainter_identity(config)
    other = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Identity()).save(str(other))
    monkeypatch.setenv("LAMA_MODEL", str(other))
    assert inpainter_identity(config) != first


@pytest.mark.parametrize("value", [None, "", "/nonexistent/big-lama.pt"])
def test_lama_without_model_file_fails_fast(value, monkeypatch):
    if value is None:
        monkeypatch.delenv("LAMA_MODEL", raising=False)
    else:
        monkeypatch.setenv("LAMA_MODEL", value)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the LaMa model")

    monkeypatch.setattr("simple_lama_inpainting.models.model.download_model", no_download)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="LAMA_MODEL"):
        load_inpainter(RemoveConfig(inpaint="lama", device="cpu"))
    with pytest.raises(ValueError, match="LAMA_MODEL"):
        LamaInpainter(RemoveConfig(inpaint="lama", device="cpu"))
    assert time.perf_counter() - start < 1
