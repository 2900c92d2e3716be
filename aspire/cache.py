"""Content-keyed, atomically committed stage outputs.

Layout of one stage run (see ARCHITECTURE.md, "A stage")::

    <workdir>/<stage>/<key>/shard-00000/rows.jsonl      rows this shard produced
                            shard-00000/quarantine.jsonl rows it set aside, with reasons
                            shard-00000/DONE.json        marker: row count, file digests, input digest
                            model/ ...                   other named parts (same commit rule)
                            rows.jsonl, DONE.json        the stage's whole output, once every part is in

``key`` hashes the stage name, its version, its config, the backend identity and the input digest, so a
change to any of them writes to a new folder and leaves the old one untouched. A part is written into a
temporary folder, renamed into place, and only then marked done; a folder without a valid marker is
half-written and is redone. Writers of the same part take a file lock, so two runs (a scheduled one and
a manual one) never interleave. The markers, not Prefect's cache, decide what is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from aspire.manifest import Row, digest, read_jsonl, write_jsonl

MARKER = "DONE.json"
ROWS = "rows.jsonl"
QUARANTINE = "quarantine.jsonl"
RUNNING_LOCK = ".running.lock"
RETRYABLE = "retryable"


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


def write_text_atomic(path: Path, text: str, sweep: bool = False) -> None:
    """Write ``text`` beside ``path`` and rename it into place: a reader or a second writer sees the old file or
    the new one, never half of one; on failure (a full disk) the old file stays and no temporary file is left.

    A process killed between the write and the rename leaves its temporary file behind. ``sweep=True`` removes
    such files first; pass it only while holding a lock every writer of ``path`` holds (then any temporary file
    there belongs to a dead writer)."""
    if sweep:
        remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files ``.<name>.tmp-*`` that writers of ``path`` killed before their rename left.
    Call it only while holding a lock every writer of ``path`` holds."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def _write_json_atomic(path: Path, value: Any) -> None:
    """Markers: always written under their part's or stage's lock, so stale temporary files are swept."""
    write_text_atomic(path, json.dumps(value, indent=1, default=str), sweep=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` (created empty) across threads and processes, for the block."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _retarget(rows: list[Row], old: Path, new: Path) -> list[Row]:
    """Point ``path`` and ``*_path`` values inside the temporary folder at the committed folder."""
    prefix = str(old) + os.sep

    def moved(key: str, value: Any) -> Any:
        if (key == "path" or key.endswith("_path")) and isinstance(value, str) and value.startswith(prefix):
            return str(new) + os.sep + value[len(prefix):]
        return value

    return [{key: moved(key, value) for key, value in row.items()} for row in rows]


def retry_pending(marker: dict[str, Any]) -> int:
    """Rows a committed shard (its ``stats``) or stage (its summary's ``stats``) kept as failed but worth another
    try, e.g. captions an LLM server answered with 429 or 500: stat ``retryable``. Such an output is committed, so
    the run goes on, yet it is not final: the next run computes it again (a per-item cache makes that cheap)."""
    stats = marker.get("stats") or (marker.get("summary") or {}).get("stats") or {}
    return int(stats.get(RETRYABLE, 0) or 0)


def read_part_marker(folder: Path) -> dict[str, Any] | None:
    """A part folder's marker if the part is committed and its checked files are intact, else ``None``."""
    marker = _read_json_dict(Path(folder) / MARKER)
    if marker is None:
        return None
    for file_name, expected in marker.get("files", {}).items():
        path = Path(folder) / file_name
        if not path.is_file() or file_digest(path) != expected:
            return None
    return marker


@dataclass(frozen=True)
class ShardResult:
    """What a shard function returns: kept rows, quarantine records ``{image_id, path, reason}`` and
    numeric stats (summed over shards into the stage summary, e.g. tokens used)."""

    rows: list[Row]
    quarantine: list[Row]
    stats: dict[str, float] = field(default_factory=dict)


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

    def part_ref(self, name: str) -> str:
        """The part's path relative to the workdir, as stage markers list the parts they depend on."""
        return f"{self.stage}/{self.key}/{name}"

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:05d}"

    # -- a run computing the stage ------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Held (a shared lock) while a run computes this stage, so :meth:`is_running` sees it from any process;
        released by the kernel when the run dies, however it dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / RUNNING_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        """Whether some live run is computing this stage now (holds :meth:`running`)."""
        path = self.root / RUNNING_LOCK
        if not path.is_file():
            return False
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

    # -- parts (shards and named artifacts) -------------------------------------------------------------

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """The part's marker if the part is committed and intact, else ``None``."""
        return read_part_marker(self.part_dir(name))

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Exclusive lock of one part across threads and processes (held while it is checked and written)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / f".{name}.lock"):
            yield

    def ensure_part(self, name: str, write: Callable[[Path], dict[str, Any] | None], input_digest: str = "",
                    checked_files: tuple[str, ...] = ()) -> dict[str, Any]:
        """Return the part's marker if it is committed for ``input_digest``; else build it atomically.

        ``write(tmp_dir)`` fills a temporary folder, which is renamed into place and then marked done;
        ``write`` may return extra marker fields. ``checked_files`` are digested into the marker and
        verified on every read. The returned marker has ``cached`` set to whether the part was there."""
        with self._locked(name):
            marker = self.read_marker(name)
            if marker is not None and marker.get("input_digest") == input_digest and not retry_pending(marker):
                return {**marker, "cached": True}
            final = self.part_dir(name)
            for stale in self.root.glob(f".{name}.tmp-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
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
            marker = {"name": name, "input_digest": input_digest, "files": files, "token": uuid.uuid4().hex,
                      "committed_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **extra}
            _write_json_atomic(final / MARKER, marker)
            return {**marker, "cached": False}

    # -- shards ------------------------------------------------------------------------------------------

    @staticmethod
    def shard_input_digest(input_rows: list[Row], salt: str = "") -> str:
        """What a shard's output depends on besides the stage key: its rows, and e.g. the model's digest."""
        return digest({"rows": input_rows, "salt": salt})

    def shard_is_current(self, index: int, input_rows: list[Row], salt: str = "") -> bool:
        """Whether the shard is committed, intact, was computed from these input rows (and salt) and has no
        failures left to retry."""
        marker = self.read_marker(self.shard_name(index))
        return (marker is not None and marker.get("input_digest") == self.shard_input_digest(input_rows, salt)
                and not retry_pending(marker))

    def ensure_shard(self, index: int, input_rows: list[Row], run: Callable[[list[Row], Path], ShardResult],
                     salt: str = "") -> dict:
        """Return the shard's marker if it is committed for these input rows; else run and commit it.

        ``run(rows, out_dir)`` computes the shard. Files it writes into ``out_dir`` end up in the committed
        folder, and row ``path`` values pointing into ``out_dir`` are rewritten to point there."""
        name = self.shard_name(index)

        def write(tmp: Path) -> dict[str, Any]:
            start = time.perf_counter()
            result = run(input_rows, tmp)
            write_jsonl(_retarget(result.rows, tmp, self.part_dir(name)), tmp / ROWS)
            write_jsonl(result.quarantine, tmp / QUARANTINE)
            return {"rows": len(result.rows), "quarantined": len(result.quarantine), "stats": result.stats,
                    "seconds": round(time.perf_counter() - start, 3)}

        return self.ensure_part(name, write, self.shard_input_digest(input_rows, salt), (ROWS, QUARANTINE))

    def read_shard(self, index: int) -> ShardResult:
        folder = self.part_dir(self.shard_name(index))
        stats = (read_part_marker(folder) or {}).get("stats", {})
        return ShardResult(read_jsonl(folder / ROWS), read_jsonl(folder / QUARANTINE), stats)

    # -- the whole stage ---------------------------------------------------------------------------------

    def commit_stage(self, rows: list[Row], summary: dict[str, Any], parts: list[str] = ()) -> dict[str, Any]:
        """Write the stage's whole output and its marker, after every part it depends on is committed.

        ``parts`` are workdir-relative part folders (``part_ref``); their marker tokens are recorded, so the
        stage is stale once any of them is deleted, half-written or recommitted."""
        tokens = {}
        for ref in parts:
            marker = read_part_marker(Path(self.workdir) / ref)
            if marker is None:
                raise RuntimeError(f"{self.stage}: part {ref} is not committed; cannot commit the stage")
            tokens[ref] = marker["token"]
        # under the stage's lock, rows first (written beside, then renamed): a second run committing the same
        # stage, or a reader, never sees a half-written rows file under a valid marker
        with self._locked("stage"):
            remove_stale_temporaries(self.root / ROWS)  # left by a run killed here
            tmp = self.root / f".{ROWS}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                write_jsonl(rows, tmp)
                os.replace(tmp, self.root / ROWS)
            except BaseException:  # e.g. the disk is full: the previous commit, if any, stays as it was
                tmp.unlink(missing_ok=True)
                raise
            marker = {"rows": len(rows), "digest": file_digest(self.root / ROWS), "parts": tokens,
                      "summary": summary, "committed_at": time.time()}
            _write_json_atomic(self.root / MARKER, marker)
        return marker

    def stage_marker(self) -> dict[str, Any] | None:
        """The stage marker if the stage output is committed and intact, and so are the parts it used."""
        marker = _read_json_dict(self.root / MARKER)
        rows_file = self.root / ROWS
        if marker is None or not rows_file.is_file() or file_digest(rows_file) != marker.get("digest"):
            return None
        for ref, token in marker.get("parts", {}).items():
            part = read_part_marker(Path(self.workdir) / ref)
            if part is None or part.get("token") != token:
                return None
        return marker

    def read_rows(self) -> list[Row]:
        return read_jsonl(self.root / ROWS)


def shards(rows: list[Row], size: int) -> list[list[Row]]:
    """Split rows into consecutive shards of at most ``size`` rows (always at least one shard)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]
