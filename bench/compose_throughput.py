"""Compositor throughput: composed 224x224 JPEGs per second, the compose stage against a plain per-image PIL loop
doing the same work in the same run; and background preparation (mask, dilate, inpaint, resize) per second.

Both compose paths start from the same prepared backgrounds (224x224 PNG) and object crops (PNG) and write the
same compositions (same boxes and places, JPEG quality 95):
- plain loop: per composition, open the background and the object with PIL, resize the object, paste, save;
- compose stage (``tasks.compose.run_compose``): shards of 256 rows sorted by foreground image on a pool of
  ``--threads`` threads (the flow's ``threads`` runner), each image decoded once per shard, OpenCV resize and
  JPEG encode.

Usage: python bench/compose_throughput.py [--classes 4] [--threads 2] [--inpaint opencv]
The source tree (ImageNet-like sizes, 315-540 x 270-450 px) is written under a temp folder.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from aspire.compose import plan
from aspire.config import ComposeRunConfig
from aspire.imagenet import read_imagenet
from tasks.compose import run_backgrounds, run_compose
from tests.imagenet_tree import CLASSES, make_tree


def plain_loop(rows: list[dict], out: Path, quality: int) -> None:
    for row in rows:
        background = Image.open(row["background_path"]).convert("RGB")
        obj = Image.open(row["object_path"])
        x0, y0, x1, y1 = row["object_box"]
        obj = obj.resize((x1 - x0, y1 - y0), Image.BILINEAR)
        background.paste(obj, (x0, y0), obj if obj.mode == "RGBA" else None)
        background.save(out / f"{row['image_id']}.jpg", quality=quality)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inpaint", default="opencv")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compose-bench-"))
    try:
        root = make_tree(work / "tree", "voc", train=60, val=20, unboxed=0, classes=tuple(CLASSES)[: args.classes],
                         scale=4.5)
        config = ComposeRunConfig.model_validate({
            "workdir": str(work / "run"), "source": {"root": str(root)},
            "compose": {"counts": {"train_easy": 40, "train_other": 5, "val": 10, "test": 20}},
            "remove": {"inpaint": args.inpaint, "segment": "box"}})
        sources = read_imagenet(root)
        prepared_dir = work / "prepared"
        prepared_dir.mkdir()
        start = time.perf_counter()
        prepared = run_backgrounds(sources.rows, prepared_dir, config).rows
        prepare_s = time.perf_counter() - start
        by_id = {r["image_id"]: r for r in prepared}
        names = {r["wnid"]: r["class_name"] for r in prepared}
        rows = plan(prepared, sorted(names), config.compose, names, "v1")
        rows = sorted(({**r, "background_path": by_id[r["background_image"]]["background_path"],
                        "object_path": by_id[r["foreground_image"]]["object_path"]} for r in rows),
                      key=lambda r: (r["foreground_image"], r["image_id"]))
        shards = [rows[i : i + 256] for i in range(0, len(rows), 256)]
        best_plain = best_stage = float("inf")
        for repeat in range(args.repeats):
            out = work / f"plain-{repeat}"
            out.mkdir()
            start = time.perf_counter()
            plain_loop(rows, out, 95)
            best_plain = min(best_plain, time.perf_counter() - start)
            out = work / f"stage-{repeat}"
            folders = [out / str(i) for i in range(len(shards))]
            for folder in folders:
                folder.mkdir(parents=True)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda pair: run_compose(pair[0], pair[1], 95), zip(shards, folders)))
            best_stage = min(best_stage, time.perf_counter() - start)
        print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
              f"{len(__import__('os').sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d')}")
        print(f"sources: {len(sources.rows)} images ({args.classes} classes); backgrounds ({args.inpaint}): "
              f"{len(prepared) / prepare_s:.1f} images/s ({prepare_s:.1f} s)")
        print(f"compositions: {len(rows)} at 224x224 JPEG q95, best of {args.repeats}")
        print(f"plain PIL loop:          {len(rows) / best_plain:8.0f} images/s ({best_plain:.2f} s)")
        print(f"compose stage ({args.threads} threads): {len(rows) / best_stage:8.0f} images/s ({best_stage:.2f} s), "
              f"{best_plain / best_stage:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
