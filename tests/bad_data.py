"""A corpus of bad data: one small, valid ``hf-imagefolder`` dataset and, per kind of defect, a function that
plants that defect in it. Used by ``tests/test_bad_data.py`` (a test per kind) and ``bench/bad_data.py`` (every
kind through the CLI and one whole pipeline run).

Each kind says what the pipeline must do with it:

- ``quarantined``: the listing succeeds; the bad image gets a quarantine record whose reason matches ``words``
  and every other image goes on.
- ``rejected``: a one-line error matching ``words`` and naming the offending file (``names`` is what else it
  must name, e.g. ``line 3``), raised while listing the dataset, before anything runs.
- ``loaded``: the image is fine once decoded properly; :func:`aspire.images.load_rgb` gives ``expect_pixel``
  at its centre and ``expect_size``.

The base dataset: classes ``cat`` and ``dog``, 4 train, 2 val and 2 test images each, at
``<root>/<split>/<class>/<name>.png`` with ``<root>/<split>/metadata.csv`` (``file_name,label``). A planted
image is added to ``train/cat`` (label 0) with its own metadata row.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog")
SPLIT_SIZES = {"train": 4, "val": 2, "test": 2}
SIZE = 16
RED = (220, 20, 20)


@dataclass(frozen=True)
class Kind:
    """One kind of defect.

    Attributes:
        name: what a user would call it.
        expect: ``quarantined``, ``rejected`` or ``loaded``.
        plant: ``plant(root) -> path`` plants the defect in a base dataset and returns the file at fault
            (the image, or the metadata file).
        words: regex the quarantine reason or error message must match.
        names: what the error must name besides the file (e.g. ``line 3``).
        expect_pixel: for ``loaded``, the RGB value at the image's centre (within 12 per channel).
        expect_size: for ``loaded``, (width, height) after decoding.
    """

    name: str
    expect: str
    plant: Callable[[Path], Path]
    words: str = ""
    names: str = ""
    expect_pixel: tuple[int, int, int] | None = None
    expect_size: tuple[int, int] = (SIZE, SIZE)


# ------------------------------------------------------------------------------------------------ the base


def base_dataset(root: Path) -> int:
    """Write the valid base dataset under ``root``; returns its number of images."""
    count = 0
    for split, n in SPLIT_SIZES.items():
        lines = ["file_name,label"]
        for label, name in enumerate(CLASSES):
            for i in range(n):
                path = root / split / name / f"{name}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), (40 + 100 * label, 60, 20 * i)).save(path)
                lines.append(f"{name}/{path.name},{label}")
                count += 1
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    return count


def metadata(root: Path, split: str = "train") -> Path:
    return root / split / "metadata.csv"


def add_row(root: Path, cells: str, split: str = "train") -> Path:
    """Append one raw line to a split's metadata.csv."""
    meta = metadata(root, split)
    meta.write_text(meta.read_text() + cells + "\n")
    return meta


def add_file(root: Path, name: str, data: bytes, label: int = 0) -> Path:
    """Write ``data`` as ``train/<class>/<name>`` and list it in the metadata."""
    path = root / "train" / CLASSES[label] / name
    path.write_bytes(data)
    add_row(root, f"{CLASSES[label]}/{name},{label}")
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def red(mode: str = "RGB", size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    return Image.new("RGB", size, RED).convert(mode)


# ------------------------------------------------------------------------------------------------ image files


def truncated_jpeg(root: Path) -> Path:
    data = encoded(noise(), "JPEG")
    return add_file(root, "truncated.jpg", data[: len(data) // 2])


def truncated_png(root: Path) -> Path:
    data = encoded(noise(), "PNG")
    return add_file(root, "truncated.png", data[: len(data) // 2])


def corrupt_png(root: Path) -> Path:
    """One byte of the compressed pixel data flipped (the zlib stream breaks)."""
    data = bytearray(encoded(noise(), "PNG"))
    data[len(data) // 2] ^= 0xFF
    return add_file(root, "corrupt.png", bytes(data))


def corrupt_jpeg_header(root: Path) -> Path:
    """The start-of-frame segment overwritten: a JPEG that no decoder can read."""
    data = bytearray(encoded(noise(), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 2 : at + 12] = b"\x00" * 10
    return add_file(root, "corrupt-header.jpg", bytes(data))


def damaged_jpeg_scan(root: Path) -> Path:
    """200 bytes of the entropy-coded data overwritten: JPEG has no checksum, so this decodes (to wrong pixels)
    in Pillow, libjpeg, OpenCV and torchvision alike."""
    data = bytearray(encoded(red(size=(64, 64)), "JPEG"))
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xaa" * 8
    return add_file(root, "damaged-scan.jpg", bytes(data))


def zero_bytes(root: Path) -> Path:
    return add_file(root, "empty.png", b"")


def text_as_jpeg(root: Path) -> Path:
    return add_file(root, "notes.jpg", b"this is not an image, just a text file someone renamed\n")


def html_as_png(root: Path) -> Path:
    """What a failed download saves: an error page under the image's name."""
    return add_file(root, "download.png", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")


def decompression_bomb(root: Path) -> Path:
    """A 10,000 x 10,000 PNG (100 MP) of one colour: 4 kB on disk, 300 MB once decoded."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * 10_000 for _ in range(10_000)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    return add_file(root, "bomb.png", png)


def missing_file(root: Path) -> Path:
    add_row(root, "cat/gone.png,0")
    return root / "train" / "cat" / "gone.png"


def folder_named_like_an_image(root: Path) -> Path:
    folder = root / "train" / "cat" / "folder.png"
    folder.mkdir()
    add_row(root, "cat/folder.png,0")
    return folder


# ------------------------------------------------------------------------------------------------ odd but valid


def cmyk_jpeg(root: Path) -> Path:
    return add_file(root, "cmyk.jpg", encoded(red("CMYK"), "JPEG", quality=95))


def sixteen_bit_png(root: Path) -> Path:
    """16-bit grayscale at half scale (32768): 128 in 8 bits, where a plain ``convert("RGB")`` clips to 255."""
    image = Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16))
    return add_file(root, "sixteen-bit.png", encoded(image, "PNG"))


def palette_png(root: Path) -> Path:
    image = red().convert("P", palette=Image.ADAPTIVE)
    return add_file(root, "palette.png", encoded(image, "PNG", transparency=255))


def grayscale_png(root: Path) -> Path:
    return add_file(root, "gray.png", encoded(Image.new("L", (SIZE, SIZE), 90), "PNG"))


def rgba_png(root: Path) -> Path:
    return add_file(root, "rgba.png", encoded(Image.new("RGBA", (SIZE, SIZE), (*RED, 128)), "PNG"))


def one_pixel(root: Path) -> Path:
    return add_file(root, "one-pixel.png", encoded(red(size=(1, 1)), "PNG"))


def exif_rotated(root: Path) -> Path:
    """A phone photo: stored 32 x 16 with EXIF orientation 6 (shown turned 90 degrees clockwise, 16 x 32)."""
    image = Image.new("RGB", (32, 16), RED)
    exif = image.getexif()
    exif[0x0112] = 6
    return add_file(root, "rotated.jpg", encoded(image, "JPEG", exif=exif.tobytes(), quality=95))


def png_named_jpg(root: Path) -> Path:
    return add_file(root, "really-a-png.jpg", encoded(red(), "PNG"))


def unicode_and_spaces(root: Path) -> Path:
    path = root / "train" / "cat" / "été à Paris, n°1.png"
    path.write_bytes(encoded(red(), "PNG"))
    add_row(root, '"cat/été à Paris, n°1.png",0')
    return path


def bom_metadata(root: Path) -> Path:
    meta = metadata(root)
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    return meta


# ------------------------------------------------------------------------------------------------ metadata


def duplicate_id_in_split(root: Path) -> Path:
    meta = metadata(root)
    lines = meta.read_text().splitlines()
    lines = ["file_name,label,image_id"] + [f"{line},id{i}" for i, line in enumerate(lines[1:])]
    lines[2] = lines[2].rsplit(",", 1)[0] + ",id0"
    meta.write_text("\n".join(lines) + "\n")
    return meta


def duplicate_id_across_splits(root: Path) -> Path:
    for split in ("train", "test"):
        meta = metadata(root, split)
        lines = meta.read_text().splitlines()
        lines = ["file_name,label,image_id"] + [f"{line},{split}{i}" for i, line in enumerate(lines[1:])]
        if split == "test":
            lines[1] = lines[1].rsplit(",", 1)[0] + ",train0"
        meta.write_text("\n".join(lines) + "\n")
    return metadata(root, "test")


def same_file_twice(root: Path) -> Path:
    meta = metadata(root)
    meta.write_text(meta.read_text().replace("file_name,label\n", "file_name,label,image_id\n", 1))
    lines = meta.read_text().splitlines()
    lines[1:] = [f"{line},id{i}" for i, line in enumerate(lines[1:])] + ["cat/cat0.png,0,again"]
    meta.write_text("\n".join(lines) + "\n")
    return root / "train" / "cat" / "cat0.png"


def label_not_a_number(root: Path) -> Path:
    return add_row(root, "cat/cat0.png,cat")


def label_out_of_range(root: Path) -> Path:
    (root / "train" / "cat" / "extra.png").write_bytes(encoded(red(), "PNG"))
    return add_row(root, "cat/extra.png,5")


def label_disagrees_with_folder(root: Path) -> Path:
    (root / "train" / "dog" / "mislabelled.png").write_bytes(encoded(red(), "PNG"))
    return add_row(root, "dog/mislabelled.png,0")


def empty_label_cell(root: Path) -> Path:
    (root / "train" / "cat" / "extra.png").write_bytes(encoded(red(), "PNG"))
    return add_row(root, "cat/extra.png,")


def row_with_missing_cells(root: Path) -> Path:
    return add_row(root, "cat/cat0.png")


def row_with_extra_cells(root: Path) -> Path:
    return add_row(root, "cat/cat1.png,0,surplus,cells")


def wrong_delimiter(root: Path) -> Path:
    meta = metadata(root)
    meta.write_text(meta.read_text().replace(",", ";"))
    return meta


def latin1_metadata(root: Path) -> Path:
    folder = root / "train" / "café"
    folder.mkdir()
    (folder / "a.png").write_bytes(encoded(red(), "PNG"))
    meta = metadata(root)
    meta.write_bytes(meta.read_bytes() + "café/a.png,0\n".encode("latin-1"))
    return meta


def empty_file_name(root: Path) -> Path:
    return add_row(root, ",0")


def no_file_name_column(root: Path) -> Path:
    meta = metadata(root)
    meta.write_text(meta.read_text().replace("file_name,label", "filename,label", 1))
    return meta


def path_outside_root(root: Path) -> Path:
    outside = root.parent / f"{root.name}-elsewhere.png"
    outside.write_bytes(encoded(red(), "PNG"))
    return add_row(root, f"../../{outside.name},0")


def absolute_path(root: Path) -> Path:
    outside = root.parent / f"{root.name}-absolute.png"
    outside.write_bytes(encoded(red(), "PNG"))
    return add_row(root, f"{outside},0")


def broken_jsonl(root: Path) -> Path:
    csv_meta = metadata(root, "val")
    csv_meta.unlink()
    meta = root / "val" / "metadata.jsonl"
    meta.write_text('{"file_name": "cat/cat0.png", "label": 0}\n{"file_name": "cat/cat1.png", "label": 0\n')
    return meta


def class_without_training_images(root: Path) -> Path:
    folder = root / "test" / "bird"
    folder.mkdir()
    (folder / "b.png").write_bytes(encoded(red(), "PNG"))
    add_row(root, "bird/b.png,2", split="test")
    return root


KINDS: list[Kind] = [
    Kind("truncated JPEG", "quarantined", truncated_jpeg, r"truncated image"),
    Kind("truncated PNG", "quarantined", truncated_png, r"truncated image"),
    Kind("corrupt PNG (pixel data)", "quarantined", corrupt_png, r"corrupt image: broken data stream"),
    Kind("corrupt JPEG (frame header)", "quarantined", corrupt_jpeg_header, r"(corrupt|not an) image"),
    Kind("zero-byte file", "quarantined", zero_bytes, r"empty file \(0 bytes\)"),
    Kind("text file with an image extension", "quarantined", text_as_jpeg, r"not an image"),
    Kind("HTML error page saved as .png", "quarantined", html_as_png, r"not an image"),
    Kind("decompression-bomb sized (100 MP)", "quarantined", decompression_bomb, r"image too large: 10000 x 10000"),
    Kind("missing file", "quarantined", missing_file, r"missing file"),
    Kind("folder named like an image", "quarantined", folder_named_like_an_image, r"a folder, not an image file"),
    Kind("damaged JPEG scan data", "loaded", damaged_jpeg_scan, expect_size=(64, 64)),
    Kind("CMYK JPEG", "loaded", cmyk_jpeg, expect_pixel=RED),
    Kind("16-bit grayscale PNG", "loaded", sixteen_bit_png, expect_pixel=(128, 128, 128)),
    Kind("palette PNG with transparency", "loaded", palette_png, expect_pixel=RED),
    Kind("grayscale PNG", "loaded", grayscale_png, expect_pixel=(90, 90, 90)),
    Kind("RGBA PNG", "loaded", rgba_png, expect_pixel=RED),
    Kind("1 x 1 image", "loaded", one_pixel, expect_pixel=RED, expect_size=(1, 1)),
    Kind("EXIF-rotated JPEG", "loaded", exif_rotated, expect_pixel=RED, expect_size=(16, 32)),
    Kind("PNG bytes named .jpg", "loaded", png_named_jpg, expect_pixel=RED),
    Kind("unicode and spaces in names", "loaded", unicode_and_spaces, expect_pixel=RED),
    Kind("UTF-8 BOM in metadata.csv", "loaded", bom_metadata),
    Kind("duplicate image_id within a split", "rejected", duplicate_id_in_split,
         r"image_id 'id0' was already used at .*line 2", names="line 3"),
    Kind("duplicate image_id across splits", "rejected", duplicate_id_across_splits,
         r"image_id 'train0' was already used at .*test.metadata.csv line 2", names="line 2"),
    Kind("one file listed twice", "rejected", same_file_twice, r"are the same file"),
    Kind("label that is not a number", "rejected", label_not_a_number, r"'label' has value 'cat'", names="line 10"),
    Kind("out-of-range label", "rejected", label_out_of_range, r"label 5 is out of range", names="line 10"),
    Kind("label that disagrees with the class folder", "rejected", label_disagrees_with_folder,
         r"label 0 with class 'dog'", names="line 10"),
    Kind("empty label cell", "rejected", empty_label_cell, r"the 'label' cell is empty", names="line 10"),
    Kind("row with missing cells", "rejected", row_with_missing_cells, r"fewer cells than columns", names="line 10"),
    Kind("row with extra cells", "rejected", row_with_extra_cells, r"more cells than columns", names="line 10"),
    Kind("wrong delimiter (;)", "rejected", wrong_delimiter, r"the delimiter looks like ';'"),
    Kind("Latin-1 metadata.csv", "rejected", latin1_metadata, r"not UTF-8 text"),
    Kind("empty file_name cell", "rejected", empty_file_name, r"column 'file_name' is empty", names="line 10"),
    Kind("no file_name column", "rejected", no_file_name_column, r"missing column 'file_name'"),
    Kind("relative path escaping the root", "rejected", path_outside_root, r"outside the dataset root", names="line 10"),
    Kind("absolute path outside the root", "rejected", absolute_path, r"outside the dataset root", names="line 10"),
    Kind("invalid JSON line in metadata.jsonl", "rejected", broken_jsonl, r"not valid JSON", names="line 2"),
    Kind("class with no training images", "rejected", class_without_training_images, r"classes \['bird'\] have no training images"),
]
