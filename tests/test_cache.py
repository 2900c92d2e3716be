"""The cache rules: keys, atomic shard commits, skips, redo of half-written or tampered shards."""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aspire.cache import ShardResult, StageStore, retry_pending, shards, stage_key

ROWS = [{"image_id": f"img{i}", "path": f"/x/{i}.png", "label": i % 2, "class_name": "ab"[i % 2], "split": "train"}
        for i in range(10)]


class Counter:
    """A shard function that counts its calls and writes one file per row."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rows, out_dir: Path) -> ShardResult:
        self.calls += 1
        out = []
        for row in rows:
            (out_dir / f"{row['image_id']}.txt").write_text(row["image_id"])
            out.append({**row, "path": str(out_dir / f"{row['image_id']}.txt"), "seen": True})
        return ShardResult(out, [{"image_id": "bad", "path": "/bad", "reason": "test"}])


def test_stage_key_depends_on_every_input():
    base = dict(stage="s", version=1, config={"a": 1}, backend="b", input_digest="d")
    key = stage_key(**base)
    assert key == stage_key(**base)
    for change in ({"stage": "t"}, {"version": 2}, {"config": {"a": 2}}, {"backend": "c"}, {"input_digest": "e"}):
        assert stage_key(**{**base, **change}) != key


def test_shards_split_in_order():
    parts = shards(ROWS, 4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [r for p in parts for r in p] == ROWS
    assert shards([], 4) == [[]]


def test_commit_then_skip_and_retarget_paths(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    first = store.ensure_shard(0, ROWS[:3], run)
    again = store.ensure_shard(0, ROWS[:3], run)
    assert run.calls == 1 and first["cached"] is False and again["cached"] is True
    assert first["rows"] == 3 and first["quarantined"] == 1
    result = store.read_shard(0)
    committed = store.part_dir("shard-00000")
    assert all(Path(r["path"]).parent == committed and Path(r["path"]).read_text() == r["image_id"] for r in result.rows)
    assert result.quarantine[0]["reason"] == "test"
    assert not list(tmp_path.rglob(".shard-*.tmp-*"))  # no temporary folder left behind


def test_a_shard_with_retryable_failures_is_committed_but_computed_again(tmp_path):
    """Stat ``retryable`` (e.g. captions an LLM server failed): the run goes on with the shard, the next one redoes it
    until nothing is left to retry; the stage marker carrying the summed stat says the same."""
    store = StageStore(tmp_path, "stage", "k1")
    left = [2, 0]
    calls = []

    def flaky(rows, out_dir):
        calls.append(len(rows))
        return ShardResult(list(rows), [], {"retryable": left.pop(0) if left else 0})

    assert store.ensure_shard(0, ROWS[:3], flaky)["cached"] is False
    assert not store.shard_is_current(0, ROWS[:3]) and retry_pending(store.read_marker("shard-00000")) == 2
    assert store.ensure_shard(0, ROWS[:3], flaky)["cached"] is False  # redone: the failures get another try
    assert store.shard_is_current(0, ROWS[:3]) and store.ensure_shard(0, ROWS[:3], flaky)["cached"] is True
    assert calls == [3, 3]
    assert retry_pending(store.commit_stage(ROWS[:3], {"stats": {"retryable": 1}})) == 1
    assert retry_pending(store.commit_stage(ROWS[:3], {"stats": {"retryable": 0}})) == 0


def test_other_input_rows_are_recomputed(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    store.ensure_shard(0, ROWS[:3], run)
    store.ensure_shard(0, ROWS[3:6], run)
    assert run.calls == 2
    assert [r["image_id"] for r in store.read_shard(0).rows] == ["img3", "img4", "img5"]


def test_half_written_shard_is_redone(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    store.ensure_shard(0, ROWS[:3], run)
    (store.part_dir("shard-00000") / "DONE.json").unlink()  # killed between rename and marker
    assert not store.shard_is_current(0, ROWS[:3])
    store.ensure_shard(0, ROWS[:3], run)
    assert run.calls == 2 and store.shard_is_current(0, ROWS[:3])


def test_tampered_rows_file_invalidates_marker(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    store.ensure_shard(0, ROWS[:3], run)
    rows_file = store.part_dir("shard-00000") / "rows.jsonl"
    rows_file.write_text(rows_file.read_text()[:-20])  # truncated
    assert store.read_marker("shard-00000") is None
    store.ensure_shard(0, ROWS[:3], run)
    assert run.calls == 2 and len(store.read_shard(0).rows) == 3


def test_failed_shard_leaves_nothing(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")

    def boom(rows, out_dir):
        (out_dir / "partial.txt").write_text("x")
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        store.ensure_shard(0, ROWS[:3], boom)
    assert not store.part_dir("shard-00000").exists()
    assert [p.name for p in store.root.iterdir()] == [".shard-00000.lock"]


def test_stage_marker_needs_every_part_as_it_was(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    parts = shards(ROWS, 4)
    for i, part in enumerate(parts):
        store.ensure_shard(i, part, run)
    store.commit_stage(ROWS, {}, parts=[store.part_ref(store.shard_name(i)) for i in range(3)])
    assert store.stage_marker()["rows"] == len(ROWS)
    store.ensure_shard(1, parts[1], run, salt="another model")  # recommitted with other content
    assert store.stage_marker() is None
    store.commit_stage(ROWS, {}, parts=[store.part_ref(store.shard_name(i)) for i in range(3)])
    assert store.stage_marker() is not None
    shutil.rmtree(store.part_dir("shard-00001"))
    assert store.stage_marker() is None
    with pytest.raises(RuntimeError, match="not committed"):
        store.commit_stage(ROWS, {}, parts=[store.part_ref("shard-00001")])
    (store.root / "rows.jsonl").write_text("")
    assert store.stage_marker() is None


def test_salt_ties_a_shard_to_what_made_it(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()
    store.ensure_shard(0, ROWS[:3], run, salt="model-a")
    assert store.shard_is_current(0, ROWS[:3], salt="model-a")
    assert not store.shard_is_current(0, ROWS[:3], salt="model-b")
    store.ensure_shard(0, ROWS[:3], run, salt="model-b")
    assert run.calls == 2


def test_concurrent_writers_of_one_shard_compute_it_once(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    run = Counter()

    def slow(rows, out_dir):
        time.sleep(0.05)
        return run(rows, out_dir)

    with ThreadPoolExecutor(4) as pool:
        markers = list(pool.map(lambda _: store.ensure_shard(0, ROWS[:3], slow), range(8)))
    assert run.calls == 1 and sum(not m["cached"] for m in markers) == 1
    assert len(store.read_shard(0).rows) == 3


def test_stale_temporary_folders_are_cleaned(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    (store.root / ".shard-00000.tmp-dead").mkdir(parents=True)
    store.ensure_shard(0, ROWS[:3], Counter())
    assert not (store.root / ".shard-00000.tmp-dead").exists()


def test_temporary_files_of_a_run_killed_mid_commit_are_swept_by_the_next_commit(tmp_path):
    """A kill between writing a rows file or marker and renaming it leaves ``.<name>.tmp-*``; the next commit of
    the stage, under the same lock, removes it (found by bench/kill_suite.py --targets)."""
    store = StageStore(tmp_path, "stage", "k1")
    store.ensure_shard(0, ROWS[:3], Counter())
    store.root.mkdir(parents=True, exist_ok=True)
    dead = [store.root / ".rows.jsonl.tmp-dead", store.root / ".DONE.json.tmp-dead"]
    for path in dead:
        path.write_text("half")
    store.commit_stage(ROWS[:3], {}, [store.part_ref("shard-00000")])
    assert [p for p in dead if p.exists()] == []
    assert store.stage_marker()["rows"] == 3


def test_marker_that_is_not_a_dict_counts_as_missing(tmp_path):
    store = StageStore(tmp_path, "stage", "k1")
    store.ensure_shard(0, ROWS[:3], Counter())
    (store.part_dir("shard-00000") / "DONE.json").write_text("[1, 2]")
    assert store.read_marker("shard-00000") is None
    (store.root / "DONE.json").write_text("7")
    assert store.stage_marker() is None


def test_concurrent_stage_commits_never_show_a_half_written_stage(tmp_path):
    """Two runs committing the same stage while a third reads it: the reader sees a whole stage or none."""
    store = StageStore(tmp_path, "stage", "k1")
    big = [{**ROWS[0], "image_id": f"img{i}", "pad": "x" * 2000} for i in range(300)]
    seen, done = [], threading.Event()

    def commit(n):
        for _ in range(15):
            store.commit_stage(big[:n], {"n": n})

    def read():
        while not done.is_set() or not seen:
            marker = store.stage_marker()
            if marker is not None:
                rows = store.read_rows()
                seen.append(len(rows) in (100, 300) and marker["rows"] in (100, 300))

    with ThreadPoolExecutor(3) as pool:
        reader = pool.submit(read)
        for future in [pool.submit(commit, 100), pool.submit(commit, 300)]:
            future.result()
        done.set()
        reader.result()
    assert seen and all(seen)
    assert store.stage_marker()["rows"] == len(store.read_rows())
    assert not list(tmp_path.rglob(".rows.jsonl.tmp-*"))


def test_disk_full_while_writing_a_shard_leaves_nothing_marked_done_and_resumes(tmp_path, monkeypatch):
    """ENOSPC in the writer: the error reaches the caller, no marker, no temporary folder; once space is back
    the same call commits the shard (issue 16, suite 5, simulated in the writer)."""
    import errno

    import aspire.cache

    store = StageStore(tmp_path, "stage", "k1")
    real = aspire.cache.write_jsonl

    def full(rows, path):
        real(rows[:1], path)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(aspire.cache, "write_jsonl", full)
    with pytest.raises(OSError, match="No space left on device"):
        store.ensure_shard(0, ROWS[:3], Counter())
    assert store.read_marker("shard-00000") is None and not store.shard_is_current(0, ROWS[:3])
    assert not list(tmp_path.rglob("*.tmp-*")) and not store.part_dir("shard-00000").exists()
    monkeypatch.setattr(aspire.cache, "write_jsonl", real)
    assert store.ensure_shard(0, ROWS[:3], Counter())["cached"] is False
    assert len(store.read_shard(0).rows) == 3
    # the same at the stage commit: the committed stage, if any, is untouched and no temporary file is left
    store.commit_stage(ROWS[:3], {"n": 3})
    monkeypatch.setattr(aspire.cache, "write_jsonl", full)
    with pytest.raises(OSError, match="No space left on device"):
        store.commit_stage(ROWS[:5], {"n": 5})
    assert store.stage_marker()["rows"] == 3 and len(store.read_rows()) == 3
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_a_stage_is_running_exactly_while_a_live_process_computes_it(tmp_path):
    """`aspire status` from another process sees the stage running; a SIGKILL of the run ends it at once."""
    import os
    import signal
    import subprocess
    import sys

    store = StageStore(tmp_path, "caption", "k1")
    assert not store.is_running()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from aspire.cache import StageStore\n"
        f"with StageStore(Path({str(tmp_path)!r}), 'caption', 'k1').running():\n"
        "    print('holding', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert store.is_running()
        with store.running():  # a second run computing the same stage shares the lock, it does not wait
            assert store.is_running()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not store.is_running()
