"""Stage 0, ``ingest``: read the dataset into a manifest and quarantine images that cannot be decoded.

Missing, empty, truncated and non-image files are listed with their reason in the shard's quarantine;
the run goes on with the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore
from aspire.config import RunConfig
from aspire.images import check_images
from aspire.manifest import ManifestError, Row, digest, validate_rows
from aspire.readers import read_dataset
from tasks import retry_if_transient

STAGE = "ingest"
VERSION = 1


def list_dataset(config: RunConfig) -> list[Row]:
    """The dataset's rows as its reader lists them (no image is opened), checked: unique ids, every file inside
    the dataset root and listed once, every class with training images.

    Raises:
        ManifestError: naming the first offending row.
    """
    root = Path(os.path.abspath(config.dataset.root))
    where = f"dataset {root}"
    rows = validate_rows(read_dataset(config.dataset), where=where)
    owner: dict[str, str] = {}
    for row in rows:
        path = os.path.abspath(row["path"])
        if not Path(path).is_relative_to(root):
            raise ManifestError(f"{where}: image {row['image_id']!r} is outside the dataset root ({row['path']})")
        if owner.setdefault(path, row["image_id"]) != row["image_id"]:
            raise ManifestError(f"{where}: images {owner[path]!r} and {row['image_id']!r} are the same file {path} "
                                "(one image listed twice, in one split or across splits)")
    trained = {row["class_name"] for row in rows if row["split"] == "train"}
    untrained = sorted({row["class_name"] for row in rows} - trained)
    if untrained and trained:
        raise ManifestError(f"{where}: classes {untrained} have no training images (only val/test); "
                            "the classifier could never predict them")
    return rows


def listing_digest(rows: list[Row]) -> str:
    """Digest of the rows plus each file's size and modification time: changes when any image changes."""
    stats = []
    for row in rows:
        try:
            st = os.stat(row["path"])
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    return digest({"rows": rows, "stats": stats})


def run_ingest(rows: list[Row], out_dir: Path) -> ShardResult:
    """Keep rows whose image decodes; quarantine the others with a reason."""
    good, bad = check_images(rows)
    return ShardResult(good, bad)


@task(name="ingest-shard", task_run_name="ingest-shard-{index}", cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def ingest_shard_task(store: StageStore, index: int, rows: list[Row]) -> dict:
    """Check one shard's images and commit it (skipped when already committed)."""
    return store.ensure_shard(index, rows, run_ingest)
