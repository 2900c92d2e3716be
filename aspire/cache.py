"""Content-keyed, atomically committed stage outputs.

Layout of one stage run (see ARCHITECTURE.md, "A stage")::

    <workdir>/<stage>/<key>/shard-00000/rows.jsonl      rows this shard produced
                            shard-00000/quarantine.jsonl rows it set aside, with reasons
                            shard-00000/DONE.json        marker: row count, content digest, input digest
                            model/ ...                   other named parts (same commit rule)
                            rows.jsonl, DONE.json        the stage's whole output, once every part is in

``key`` hashes the stage name, its version, its config, the backend identity and the input digest, so a
change to any of them writes to a new folder and leaves the old one untouched. A part is written into a
temporary folder, renamed into place, and only then marked done; a folder without a valid marker is
half-written and is redone. The markers, not Prefect's cache, decide what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aspire.manifest import Row, canonical_json, digest, read_jsonl, write_jsonl

MARKER = "DONE.json"
ROWS = "rows.jsonl"
QUARANTINE = "quarantine.jsonl"


def stage_key(stage: str, version: int, config: Any, backend: str, input_digest: str) -> str:
    """The folder name of a stage run: a digest of everything its output depends on."""
    return digest({"stage": stage, "version": version, "config": config, "backend": backend, "input": input_digest})


def file_digest(path: Path) -> str:
    """SHA-256 (hex, first 16 chars) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _retarget(rows: list[Row], old: Path, new: Path) -> list[Row]:
    """Point ``path`` values inside the temporary folder at the committed folder."""
    prefix = str(old) + os.sep
    return [
        {**row, "path": str(new) + os.sep + row["path"][len(prefix):]}
        if isinstance(row.get("path"), str) and row["path"].startswith(prefix)
        else row
        for row in rows
    ]


def read_part_marker(folder: Path) -> dict[str, Any] | None:
    """A part folder's marker if the part is committed and its checked files are intact, else ``None``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    for file_name, expected in marker.get("files", {}).items():
        path = folder / file_name
        if not path.is_file() or file_digest(path) != expected:
            return None
    return marker


@dataclass(frozen=True)
class ShardResult:
    """What a shard function returns: kept rows and quarantine records ``{image_id, path, reason}``."""

    rows: list[Row]
    quarantine: list[Row]


@dataclass(frozen=True)
class StageStore:
    """The committed outputs of one stage run, ``<workdir>/<stage>/<key>/``."""

    workdir: Path
    stage: str
    key: str

    @property
    def root(self) -> Path:
        return Path(self.workdir) / self.stage / self.key

    def part_dir(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:05d}"

    # -- parts (shards and named artifacts) -------------------------------------------------------------

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """The part's marker if the part is committed and intact, else ``None``."""
        return read_part_marker(self.part_dir(name))

    def part_ref(self, name: str) -> str:
        """The part's path relative to the workdir, as stage summaries list the parts they depend on."""
        return f"{self.stage}/{self.key}/{name}"

    def commit(
        self,
        name: str,
        write: Callable[[Path], dict[str, Any] | None],
        input_digest: str | None = None,
        checked_files: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Write a part atomically: ``write(tmp_dir)`` fills a temporary folder, which is renamed into place
        and then marked done. ``write`` may return extra marker fields. ``checked_files`` are digested into
        the marker and verified on every read."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.part_dir(name)
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            extra = write(tmp) or {}
            files = {f: file_digest(tmp / f) for f in checked_files}
            if final.exists():  # half-written or stale: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        marker = {"name": name, "input_digest": input_digest, "files": files, "committed_at": time.time(),
                  "host": socket.gethostname(), "pid": os.getpid(), **extra}
        _write_json_atomic(final / MARKER, marker)
        return marker

    # -- shards ------------------------------------------------------------------------------------------

    def ensure_shard(self, index: int, input_rows: list[Row], run: Callable[[list[Row], Path], ShardResult]) -> dict:
        """Return the shard's marker if it is committed for these input rows; else run and commit it.

        ``run(rows, out_dir)`` computes the shard. Files it writes into ``out_dir`` end up in the committed
        folder, and row ``path`` values pointing into ``out_dir`` are rewritten to point there. The
        returned marker has ``cached`` set to whether the shard was already there."""
        name = self.shard_name(index)
        if self.shard_is_current(index, input_rows):
            return {**self.read_marker(name), "cached": True}
        input_digest = digest(input_rows)

        def write(tmp: Path) -> dict[str, Any]:
            start = time.perf_counter()
            result = run(input_rows, tmp)
            write_jsonl(_retarget(result.rows, tmp, self.part_dir(name)), tmp / ROWS)
            write_jsonl(result.quarantine, tmp / QUARANTINE)
            return {"rows": len(result.rows), "quarantined": len(result.quarantine),
                    "seconds": round(time.perf_counter() - start, 3)}

        return {**self.commit(name, write, input_digest=input_digest, checked_files=(ROWS, QUARANTINE)), "cached": False}

    def shard_is_current(self, index: int, input_rows: list[Row]) -> bool:
        """Whether the shard is committed, intact and was computed from these input rows."""
        marker = self.read_marker(self.shard_name(index))
        return marker is not None and marker.get("input_digest") == digest(input_rows)

    def read_shard(self, index: int) -> ShardResult:
        folder = self.part_dir(self.shard_name(index))
        return ShardResult(read_jsonl(folder / ROWS), read_jsonl(folder / QUARANTINE))

    # -- the whole stage ---------------------------------------------------------------------------------

    def commit_stage(self, rows: list[Row], summary: dict[str, Any]) -> None:
        """Write the stage's whole output and its marker (after every part is committed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_jsonl(rows, self.root / ROWS)
        _write_json_atomic(self.root / MARKER, {"rows": len(rows), "digest": file_digest(self.root / ROWS),
                                                 "summary": summary, "committed_at": time.time()})

    def stage_marker(self) -> dict[str, Any] | None:
        """The stage marker if the stage output is committed and intact, and so are all its parts."""
        try:
            marker = json.loads((self.root / MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        rows_file = self.root / ROWS
        if not rows_file.is_file() or file_digest(rows_file) != marker.get("digest"):
            return None
        for ref in marker.get("summary", {}).get("parts", []):
            if read_part_marker(Path(self.workdir) / ref) is None:
                return None
        return marker

    def read_rows(self) -> list[Row]:
        return read_jsonl(self.root / ROWS)

    def read_quarantine(self) -> list[Row]:
        """Every quarantine record of the committed shards."""
        records: list[Row] = []
        for folder in sorted(self.root.glob("shard-*")):
            if (folder / QUARANTINE).is_file():
                records.extend(read_jsonl(folder / QUARANTINE))
        return records


def shards(rows: list[Row], size: int) -> list[list[Row]]:
    """Split rows into consecutive shards of at most ``size`` rows (always at least one shard)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]


__all__ = ["ShardResult", "StageStore", "stage_key", "shards", "file_digest", "canonical_json"]
