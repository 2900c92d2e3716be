"""``aspire compose CONFIG``: build Hard-Spurious-ImageNet from an ImageNet-style tree (or any manifest with
boxes), as a Prefect flow of two cached, sharded stages.

sources (read, scores) -> backgrounds (inpainted backgrounds and object crops per source image) -> compose
(one JPEG per planned composition) -> output image folder with ``metadata.parquet`` per split.

A rerun recomposes nothing; changing the sizes (or any compose setting) recomposes without re-inpainting,
since the backgrounds stage's key holds only what its output depends on (:func:`tasks.compose.backgrounds_identity`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from aspire.cache import StageStore, stage_key
from aspire.compose import class_scores, plan
from aspire.config import ComposeRunConfig, load_config
from aspire.imagefolder import write_imagefolder
from aspire.imagenet import (
    Sources,
    read_imagenet,
    read_manifest_sources,
    resolve_classes,
)
from aspire.manifest import Row, digest
from aspire.readers import read_dataset
from flows.running import artifact_key, run_shards, run_stage
from flows.runtime import make_task_runner
from tasks.compose import (
    backgrounds_identity,
    backgrounds_shard_task,
    compose_shard_task,
)

OUTPUT_STAMP = ".aspire-compose"
"""File marking an output folder as written by ``aspire compose`` (only such a folder is ever replaced)."""


def read_sources(config: ComposeRunConfig) -> tuple[Sources, list[str]]:
    """Source rows of the foreground classes (and, for v2, of the background classes) and the foreground wnids."""
    source, settings = config.source, config.compose
    if source.format == "manifest":
        every = read_manifest_sources(read_dataset(source.dataset))
    else:
        every = read_imagenet(source.root, source.boxes)
    available = sorted({r["wnid"] for r in every.rows})
    names = {r["wnid"]: r["class_name"] for r in every.rows}
    wanted_backgrounds = set(settings.v2_backgrounds) if settings.variant == "v2" else set()
    background = [w for w in available if w in wanted_backgrounds or names.get(w) in wanted_backgrounds]
    foreground = [w for w in resolve_classes(source.classes, available, names, str(source.root or "dataset"))
                  if w not in background]
    keep = set(foreground) | set(background)
    rows = [r for r in every.rows if r["wnid"] in keep]
    return Sources(rows, every.quarantine, {k: v for k, v in every.without_box.items() if k in keep}), foreground


def histogram_rows(scores: list[dict], bins: int = 10) -> list[dict]:
    """Class counts per score bin, for the centeredness and size scores (the paper's Fig. 3), as table rows."""
    edges = np.linspace(0, 1, bins + 1)
    centred = np.histogram([s["centeredness"] for s in scores], edges)[0]
    size = np.histogram([s["size"] for s in scores], edges)[0]
    return [{"bin": f"{edges[i]:.1f}-{edges[i + 1]:.1f}", "centeredness": int(centred[i]), "size": int(size[i])}
            for i in range(bins)]


def plot_scores(scores: list[dict], out: Path) -> Path:
    """Histograms of the class scores (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("centeredness", "size")):
        ax.hist([s[key] for s in scores], bins=np.linspace(0, 1, 21))
        ax.set_xlabel(f"{key} score")
        ax.set_ylabel("classes")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_output(rows: list[Row], output: Path) -> list[Row]:
    """The composed images as an image folder (``<split>/<class>/<image_id>.jpg`` + ``metadata.parquet``), written
    beside and swapped in, so a half-written folder is never left; an existing folder is replaced only when
    an earlier ``aspire compose`` wrote it.

    Raises:
        FileExistsError: ``output`` exists, is not empty and was not written by ``aspire compose``.
    """
    if output.exists() and any(output.iterdir()) and not (output / OUTPUT_STAMP).is_file():
        raise FileExistsError(f"{output}: exists and was not written by aspire compose; choose another output")
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    written = write_imagefolder([{**r, "source": "composed"} for r in rows], tmp)
    (tmp / OUTPUT_STAMP).write_text(json.dumps({"images": len(rows)}))
    old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    return [{**r, "path": str(output / Path(r["path"]).relative_to(tmp))} for r in written]


@flow(name="aspire-compose")
def compose_flow(config_path: str, overrides: list[str] | None = None) -> dict:
    """Build the dataset; returns the summary also written to ``<workdir>/compose.json``."""
    logger = get_run_logger()
    config = load_config(config_path, overrides, model=ComposeRunConfig)
    settings = config.compose
    output = config.output or config.workdir / "dataset"
    sources, foreground = read_sources(config)
    for record in sources.quarantine:
        logger.warning("quarantined %s: %s", record["path"], record["reason"])
    names = {r["wnid"]: r["class_name"] for r in sources.rows}
    scores = class_scores([r for r in sources.rows if r["wnid"] in foreground])
    config.workdir.mkdir(parents=True, exist_ok=True)
    create_table_artifact(scores, key=artifact_key(config, "class-scores"),
                          description="Centeredness and size score per class (Eq. 1-2)")
    create_table_artifact(histogram_rows(scores), key=artifact_key(config, "score-histogram"),
                          description="Classes per score bin")
    plot_scores(scores, config.workdir / "scores.png")

    with make_task_runner(config.runner) as runner:
        identity = backgrounds_identity(config)
        store = StageStore(config.workdir, "backgrounds", stage_key("backgrounds", 1, identity, "", digest(sources.rows)))

        def make_backgrounds():
            rows, _, info = run_shards(runner, store, sources.rows, backgrounds_shard_task, config.runner.shard_size,
                                       config=config)
            return rows, {**info, "identity": identity}, info["parts"]

        prepared, prepared_summary = run_stage(config, "backgrounds", store, False, make_backgrounds)
        variant = settings.variant + ("-sam" if settings.mask == "segmenter" else "")
        by_id = {r["image_id"]: r for r in prepared}
        planned = plan(prepared, foreground, settings, names, variant)
        planned = sorted(({**p, "background_path": by_id[p["background_image"]]["background_path"],
                           "object_path": by_id[p["foreground_image"]]["object_path"],
                           "foreground_source_path": by_id[p["foreground_image"]]["path"],
                           "background_source_path": by_id[p["background_image"]]["path"]} for p in planned),
                         key=lambda p: (p["foreground_image"], p["image_id"]))
        store = StageStore(config.workdir, "compose", stage_key("compose", 1, settings.model_dump(mode="json"), "",
                                                                 digest(planned)))

        def make_compositions():
            rows, _, info = run_shards(runner, store, planned, compose_shard_task, config.runner.shard_size,
                                       quality=settings.jpeg_quality)
            return rows, info, info["parts"]

        composed, compose_summary = run_stage(config, "compose", store, False, make_compositions)
    composed = sorted(composed, key=lambda r: r["image_id"])
    written = write_output(composed, output)
    counts = Counter((r["split"], r["category"]) for r in written)
    quarantine = sources.quarantine + prepared_summary.get("quarantine", [])
    summary = {"output": str(output), "images": len(written), "classes": len(foreground),
               "sources": len(sources.rows), "without_box": sources.without_box, "quarantine": quarantine,
               "by_split_category": {f"{s}/{c}": n for (s, c), n in sorted(counts.items())},
               "backgrounds": {k: prepared_summary.get(k) for k in ("cached", "seconds", "shards_run", "rows_out")},
               "compose": {k: compose_summary.get(k) for k in ("cached", "seconds", "shards_run", "rows_out")},
               "scores": scores}
    (config.workdir / "compose.json").write_text(json.dumps(summary, indent=1))
    create_table_artifact([{"split/category": k, "images": v} for k, v in summary["by_split_category"].items()],
                          key=artifact_key(config, "composed"), description="Composed images per split and category")
    logger.info("composed %d images into %s", len(written), output)
    return summary
