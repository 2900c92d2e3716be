"""The ASPIRE flow under a real Prefect server: quarantine, caching, shard-level recompute, CLI, Dask."""

import csv
import io
import logging
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from aspire.cache import read_part_marker
from aspire.synth import SynthConfig, draw_background_bank, draw_benchmark

pytestmark = pytest.mark.usefixtures("prefect_server")

SMALL = dict(image_size=32, train_per_class=40, val_per_group=1, test_per_group=2)


def add_bad_images(root: Path) -> None:
    """A truncated JPEG, a zero-byte file and a row whose file is missing, added to the train split."""
    meta = root / "train" / "metadata.csv"
    with open(meta, newline="") as f:
        records = list(csv.DictReader(f))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "train" / "dog" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    for name in ("truncated.jpg", "empty.jpg", "missing.jpg"):
        records.append({**records[0], "file_name": f"dog/{name}", "image_id": f"bad-{name}"})
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


@pytest.fixture
def run_config(tmp_path) -> Path:
    root = tmp_path / "benchmark"
    draw_benchmark(SynthConfig(**SMALL), root)
    draw_background_bank(SynthConfig(**SMALL), root / "backgrounds")
    add_bad_images(root)
    config = {
        "workdir": str(tmp_path / "run"),
        "dataset": {"format": "hf-imagefolder", "root": str(root)},
        "classifier": {"arch": "small-cnn", "image_size": 32, "epochs": 2, "lr": 0.05, "batch_size": 32, "device": "cpu"},
        "holdout": {"fraction": 0.2, "seed": 0},
        "caption": {"backend": "metadata"},
        "extract": {"backend": "rules", "synonyms": {"dog": ["husky"]}},
        "remove": {"ground": "annotations", "segment": "grabcut", "inpaint": "opencv"},
        "background": {"backend": "composite", "bank": str(root / "backgrounds")},
        "personalize": {"backend": "none"},
        "generate": {"backend": "composite", "per_class": 0.5},
        "retrain": {"epochs": 1},
        "runner": {"kind": "threads", "n_workers": 2, "shard_size": 64},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, *overrides: str, **kwargs) -> dict:
    from flows.aspire import aspire_flow

    return aspire_flow(config_path=str(config), overrides=list(overrides), **kwargs)


def summary(workdir: Path, stage: str) -> dict:
    (key_dir,) = [p for p in (workdir / stage).iterdir() if (p / "DONE.json").is_file()]
    return json.loads((key_dir / "DONE.json").read_text())["summary"]


def test_flow_quarantines_caches_and_recomputes_exactly_what_changed(run_config, tmp_path):
    workdir = tmp_path / "run"
    # 1. cold run: bad images are quarantined with reasons, the rest goes on
    report = run(run_config)
    ingest = report["stages"]["ingest"]
    reasons = {Path(q["path"]).name: q["reason"] for q in report["quarantine"] if q["image_id"].startswith("bad-")}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "missing.jpg"} and ingest["failures"] == 3
    assert reasons["missing.jpg"] == "missing file" and "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    # every record (later stages may add some, e.g. a class whose held-out images gave no cutout) is in the csv
    assert (workdir / "quarantine.csv").read_text().count("\n") == 1 + len(report["quarantine"])
    assert report["counts"]["train"] == 3 * 40 and report["counts"]["holdout"] > 0
    assert 0 <= report["before"]["worst_group_acc"] <= report["before"]["avg_acc"] <= 1
    assert not report["stages"]["holdout"]["cached"]
    # the retrained model's test images, paired with the model before: per group, lost and gained images whose
    # difference is the change in the group's correct count
    changes, before, after = summary(workdir, "retrain")["test_changes"], report["before"], report["after"]
    assert set(changes) == set(after["per_group"])
    for group, (lost, gained) in changes.items():
        right = {name: round(block["per_group"][group] * block["group_sizes"][group]) for name, block in
                 (("before", before), ("after", after))}
        assert right["after"] - right["before"] == gained - lost
    lost_to = summary(workdir, "retrain")["test_lost"]  # where each group's lost images went
    assert {g: sum(d["lost_to"].values()) for g, d in lost_to.items()} == {g: n for g, (n, _) in changes.items() if n}
    scores_the_same_through_torchvision(workdir)

    # 2. warm run: everything cached, nothing trained
    report = run(run_config)
    assert all(stage["cached"] for stage in report["stages"].values())

    # 3. one prediction shard deleted: exactly that shard is recomputed, the model is not retrained, and
    #    as the predictions come out the same, nothing downstream reruns
    classifier_dir = next((workdir / "classifier").iterdir())
    shutil.rmtree(classifier_dir / "shard-00001")
    report = run(run_config)
    assert report["stages"]["ingest"]["cached"] and not report["stages"]["classifier"]["cached"]
    assert summary(workdir, "classifier")["shards_run"] == 1 and summary(workdir, "classifier")["trained"] is False
    assert report["stages"]["holdout"]["cached"] and report["stages"]["extract"]["cached"]

    # 4. one ingest shard half-written (marker gone): only it is redone, downstream stays cached
    ingest_dir = next((workdir / "ingest").iterdir())
    (ingest_dir / "shard-00002" / "DONE.json").unlink()
    report = run(run_config)
    assert summary(workdir, "ingest")["shards_run"] == 1
    assert report["stages"]["classifier"]["cached"]

    # 5. a holdout-only change reselects and recaptions without retraining; a classifier change retrains
    report = run(run_config, "holdout.fraction=0.5")
    assert not report["stages"]["holdout"]["cached"] and report["stages"]["classifier"]["cached"]
    assert not report["stages"]["caption"]["cached"]
    report = run(run_config, "classifier.epochs=1")
    assert len(list((workdir / "classifier").iterdir())) == 2 and report["stages"]["ingest"]["cached"]
    # 6. a new shard size is an execution choice: nothing is retrained, the results are the same
    model_markers = {p: p.stat().st_mtime_ns for p in workdir.glob("classifier/*/model/DONE.json")}
    resharded = run(run_config, "classifier.epochs=1", "runner.shard_size=50")
    assert {p: p.stat().st_mtime_ns for p in workdir.glob("classifier/*/model/DONE.json")} == model_markers
    assert resharded["before"] == report["before"] and resharded["counts"] == report["counts"]


def scores_the_same_through_torchvision(workdir: Path) -> None:
    """The run's checkpoint, scored against torchvision ImageFolder's targets on the export, gets the accuracy the
    run measured: one class order in the checkpoint, the manifest and the exported folders."""
    import torchvision

    from aspire.classifier import load_model, predict_images
    from aspire.manifest import read_jsonl

    (checkpoint,) = workdir.glob("classifier/*/model/model.pt")
    model, config, class_names = load_model(checkpoint)
    test = torchvision.datasets.ImageFolder(str(Path(summary(workdir, "export")["folder"]) / "test"))
    assert test.classes == class_names
    preds, _ = predict_images(model, [Image.open(p).convert("RGB") for p, _ in test.samples], config.image_size)
    through_torchvision = np.mean([p == t for p, (_, t) in zip(preds, test.samples)])
    predicted = [r for f in checkpoint.parents[1].glob("shard-*/rows.jsonl") for r in read_jsonl(f) if r["split"] == "test"]
    assert len(predicted) == len(test.samples)
    assert through_torchvision == pytest.approx(np.mean([r["pred"] == r["label"] for r in predicted]))


def test_cli_status_stage_force_and_bad_config(run_config, tmp_path):
    from flows.cli import app
    from flows.keys import STAGES

    runner = CliRunner()
    result = runner.invoke(app, ["status", str(run_config)])
    assert result.exit_code == 0 and "missing" in result.output

    result = runner.invoke(app, ["stage", "holdout", str(run_config)])
    assert result.exit_code == 0, result.output
    assert "worst-group accuracy" in result.output and "quarantined 3 images (ingest: 3)" in result.output
    assert "\r" not in result.output and "\x1b[" not in result.output  # not a terminal: no bars, no escape codes
    result = runner.invoke(app, ["status", str(run_config)])
    table = [line.split() for line in result.output.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    assert [cells[1] for cells in table] == ["done"] * 3 + ["missing"] + ["waiting"] * 8  # (log lines go to stderr)

    # a warm rerun is decided from the markers: no flow run, same numbers, the report rewritten
    import httpx
    from prefect.settings import PREFECT_API_URL

    def flow_runs() -> int:
        return len(httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json={"limit": 200}).raise_for_status().json())

    report_file, before_runs = tmp_path / "run" / "report.json", flow_runs()
    first = json.loads(report_file.read_text())
    report_file.unlink()
    result = runner.invoke(app, ["stage", "holdout", str(run_config)])
    assert result.exit_code == 0 and "nothing to run" in result.output, result.output
    assert flow_runs() == before_runs and json.loads(report_file.read_text())["before"] == first["before"]

    model = next((tmp_path / "run" / "classifier").iterdir()) / "model" / "DONE.json"
    before = model.stat().st_mtime_ns
    result = runner.invoke(app, ["stage", "classifier", str(run_config), "--force"])
    assert result.exit_code == 0, result.output
    assert model.stat().st_mtime_ns != before  # retrained

    result = runner.invoke(app, ["status", str(run_config), "--set", "holdout.fraction=0.9"])
    assert "stale" in result.output.splitlines()[2] and result.output.splitlines()[2].startswith("holdout")
    result = runner.invoke(app, ["run", str(run_config), "--set", "holdout.fraction=2"])
    assert result.exit_code == 2 and "holdout.fraction = 2" in result.output


def test_quoted_rows_reach_a_dask_worker_unchanged():
    """Rows go to shard tasks quoted, so Prefect does not walk them; Prefect's own quote comes back from a pickle
    as a 1-tuple around the value, which a Dask worker's task would receive as its rows."""
    import cloudpickle
    from prefect.utilities.collections import visit_collection

    from tasks import quote

    rows = [{"id": "a", "label": 0}, {"id": "b", "label": 1}]
    shipped = cloudpickle.loads(cloudpickle.dumps({"rows": quote(rows), "index": 3}))
    resolved = visit_collection(shipped, visit_fn=lambda expr: expr, return_data=True, remove_annotations=True)
    assert resolved == {"rows": rows, "index": 3}


def test_dask_runner_runs_shards_in_worker_processes(run_config, tmp_path):
    run(run_config, "runner.kind=dask", "runner.n_workers=2", until="ingest")
    ingest_dir = next((tmp_path / "run" / "ingest").iterdir())
    pids = {read_part_marker(p)["pid"] for p in ingest_dir.glob("shard-*")}
    assert pids and os.getpid() not in pids


def test_a_dask_worker_dying_mid_shard_is_replaced_and_its_shard_redone(tmp_path):
    """The worker process running shard 0 dies half-way (os._exit): Dask's nanny starts a new worker, the shard runs
    again, the run completes with every row once, and the dead attempt's temporary folder is gone."""
    from dask_faults import crash_once_shard_task
    from prefect import flow

    from aspire.cache import StageStore
    from aspire.config import RunnerConfig
    from flows.running import run_shards
    from flows.runtime import make_task_runner

    store = StageStore(tmp_path / "run", "faulty", "k1")
    rows = [{"image_id": f"img{i}", "path": f"/x/{i}.png", "label": 0, "class_name": "a", "split": "train"}
            for i in range(8)]
    flag = tmp_path / "crashed-pid"

    @flow(name="dask-worker-fault")
    def faulty():
        with make_task_runner(RunnerConfig(kind="dask", n_workers=2)) as runner:
            return run_shards(runner, store, rows, crash_once_shard_task, 2, flag=str(flag))

    out, quarantine, info = faulty()
    dead = int(flag.read_text())
    assert [r["image_id"] for r in out] == [r["image_id"] for r in rows] and not quarantine
    assert info["shards_run"] == 4 and dead not in {r["pid"] for r in out} and os.getpid() not in {r["pid"] for r in out}
    assert not list(store.root.glob(".*.tmp-*"))


def test_serve_creates_a_scheduled_deployment_that_prefect_deployment_run_triggers(run_config, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(run_config), "--cron", "0 3 * * *",
                              "--name", "nightly"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        inspect = [sys.executable, "-m", "prefect", "deployment", "inspect", "aspire/nightly"]
        for _ in range(120):  # the served deployment registers within seconds
            shown = subprocess.run(inspect, env=env, capture_output=True, text=True)
            if shown.returncode == 0:
                break
            assert serve.poll() is None, serve.stdout.read().decode()
            time.sleep(0.5)
        assert "0 3 * * *" in shown.stdout
        triggered = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "aspire/nightly", "--watch",
                                    "--watch-timeout", "240"], env=env, capture_output=True, text=True, timeout=300)
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        assert "Completed" in triggered.stdout + triggered.stderr
        assert (tmp_path / "run" / "report.json").is_file()
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def test_openai_key_never_reaches_run_folder_logs_artifacts_or_parameters(run_config, tmp_path, monkeypatch, caplog):
    from fake_openai import running_fake_openai
    import httpx
    from prefect.settings import PREFECT_API_URL

    secret = "sk-flow-SECRET-987"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with running_fake_openai() as fake:
        overrides = ["extract.backend=openai", f"extract.base_url={fake.url}", "extract.model=fake-model"]
        report = run(run_config, *overrides)
        assert fake.count > 0 and fake.auth[0] == f"Bearer {secret}"  # the key was really used
        assert report["counts"]["extracted"] == report["counts"]["captions"] > 0
        sent = fake.count
        run(run_config, *overrides, force=["extract"])  # a recomputed stage is served by the per-caption cache
        assert fake.count == sent
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text
    api = PREFECT_API_URL.value()  # what the Prefect UI shows: flow-run parameters and artifacts, via its API
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200, "offset": 0}).raise_for_status().json()
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"limit": 200, "offset": 0}).raise_for_status().json()
    assert runs and artifacts
    assert secret not in json.dumps(runs) and secret not in json.dumps(artifacts)
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL  # and Prefect's database file itself

    database = Path(str(PREFECT_API_DATABASE_CONNECTION_URL.value()).split("///", 1)[1])
    files = [f for f in database.parent.glob(f"{database.name}*") if f.is_file()]  # with -wal / -shm
    assert database in files
    stored = b"".join(path.read_bytes() for path in files)
    assert b"fake-model" in stored  # the runs' parameters are in there: the file is the one the API wrote
    assert secret.encode() not in stored


def test_failed_llm_captions_are_retried_on_a_plain_rerun_and_most_failed_stops_the_run(run_config, tmp_path,
                                                                                        monkeypatch):
    """A down server stops the run in one line (exit 1); a few failures let it go on, and a plain rerun after the
    server recovers sends exactly the failed captions again, then nothing."""
    from fake_openai import correct, error, running_fake_openai

    from flows.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", "sk-retry")
    with running_fake_openai() as fake:
        overrides = ["extract.backend=openai", f"extract.base_url={fake.url}", "extract.model=fake-model",
                     "extract.max_retries=0", "extract.captions_per_request=1"]
        fake.default = lambda items, body: error(500, "the server is down")
        result = CliRunner().invoke(app, ["stage", "extract", str(run_config), *sum([["--set", o] for o in overrides], [])])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "captions failed (extract.max_failed=0.5), most often: request failed: InternalServerError" in result.output
        captions = fake.count  # one request per caption, none answered
        assert captions > 4 and not list((tmp_path / "run" / "extract").glob("*/DONE.json"))

        def item_id(body):
            return json.loads([m for m in body["messages"] if m["role"] == "user"][-1]["content"].splitlines()[-1])[0]["id"]

        still_down = {item_id(b) for b in fake.bodies[:2]}  # two captions still fail, the others are answered
        fake.default = lambda items, body: error(500, "still down") if items[0]["id"] in still_down else correct(items, body)
        run(run_config, *overrides, until="extract")
        extract_summary = summary(tmp_path / "run", "extract")
        assert extract_summary["stats"]["retryable"] == 2 and extract_summary["failures"] == 2
        assert fake.count == 2 * captions
        status = CliRunner().invoke(app, ["status", str(run_config), *sum([["--set", o] for o in overrides], [])])
        assert "extract     retry (2 failed)" in status.output, status.output

        fake.default = correct
        run(run_config, *overrides, until="extract")  # a plain rerun: only the two failed captions are sent
        assert fake.count == 2 * captions + 2
        extract_summary = summary(tmp_path / "run", "extract")
        assert extract_summary["stats"]["retryable"] == 0 and extract_summary["failures"] == 0
        run(run_config, *overrides, until="extract")
        assert fake.count == 2 * captions + 2  # now final: nothing is sent


def comparable(report: dict) -> dict:
    """A report without what legitimately differs between runs (timings, cache hits)."""
    return {k: v for k, v in report.items() if k != "stages"}


def test_killed_run_resumes_to_the_same_report(run_config, tmp_path):
    from prefect.settings import PREFECT_API_URL

    config = yaml.safe_load(run_config.read_text())
    config["classifier"]["epochs"] = 3
    uninterrupted, killed = tmp_path / "uninterrupted.yaml", tmp_path / "killed.yaml"
    uninterrupted.write_text(yaml.safe_dump({**config, "workdir": str(tmp_path / "run-a")}))
    killed.write_text(yaml.safe_dump({**config, "workdir": str(tmp_path / "run-b")}))
    expected = run(uninterrupted)

    # kill -9 in the middle of ERM training (after its first epoch's checkpoint), then run again
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((tmp_path / "run-b").glob("classifier/*/train-checkpoint.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "run-b" / "report.json").exists()
    resumed = run(killed)
    assert comparable(resumed) == comparable(expected)


def test_train_command_compares_methods_on_original_and_augmented_data(run_config, tmp_path):
    from flows.cli import app

    run(run_config)
    result = CliRunner().invoke(app, ["train", str(run_config), "--method", "erm", "--method", "groupdro",
                                      "--seeds", "0"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "run" / "robust.json").read_text())["lines"]
    assert {(line["method"], line["data"]) for line in table} == {
        ("erm", "original"), ("erm", "augmented"), ("groupdro", "original"), ("groupdro", "augmented")}
    parts = [p for p in (tmp_path / "run" / "train").glob("*/*-seed0-*") if p.is_dir()]
    assert len(parts) == 4
    before = {p: p.stat().st_mtime_ns for p in parts}
    assert CliRunner().invoke(app, ["train", str(run_config), "--method", "erm", "--method", "groupdro"]).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in parts} == before  # a rerun trains nothing
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Robust trainers with and without the augmentations" in report
    assert "| ERM + ASPIRE |" in report and "| Group DRO |" in report and "Per-group test accuracy" in report

    # Groups from the run's spurious phrases instead of the labels; DFR on the classifier stage's ERM model.
    result = CliRunner().invoke(app, ["train", str(run_config), "--method", "groupdro", "--method", "dfr",
                                      "--set", "retrain.groups=phrases"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "robust.json").read_text())
    grouping = saved["grouping"]["original"]
    assert grouping["groups"] == "phrases" and grouping["test_groups"] == "labels"
    classes = {name.split(":")[0] for name in grouping["group_sizes"]}
    assert classes == {"dog", "bird", "car"} and any(name.endswith(":none") for name in grouping["group_sizes"])
    dfr = [r for r in saved["runs"] if r["method"] == "dfr"]
    assert len(dfr) == 2 and all(r["best_epoch"] is None for r in dfr)  # no backbone trained


def test_retrain_stage_with_a_robust_method(run_config, tmp_path):
    report = run(run_config, "retrain.method=groupdro")
    assert report["after"] is not None and not report["stages"]["retrain"]["cached"]
    assert report["stages"]["export"]["cached"] or report["stages"]["export"]["status"] == "done"
    again = run(run_config, "retrain.method=groupdro")
    assert again["stages"]["retrain"]["cached"] and again["after"] == report["after"]
    dfr = run(run_config, "retrain.method=dfr")  # a new head on the classifier stage's ERM backbone
    assert dfr["after"] is not None and not dfr["stages"]["retrain"]["cached"]


def test_clarify_and_slim_ask_the_person_then_train_from_the_files(run_config, tmp_path):
    from flows.cli import app

    run(run_config, until="extract")
    workdir = tmp_path / "run"
    answers = workdir / "slim" / "val" / "annotations.csv"
    slim_args = ["--set", "retrain.slim_queries=6", "--set", "retrain.slim_budget=0.5"]
    # Training SLIM before anyone answered: one line naming the file, the queries written for the person.
    result = CliRunner().invoke(app, ["train", str(run_config), "--method", "slim", *slim_args])
    assert result.exit_code == 2 and str(answers) in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["slim", str(run_config), *slim_args])
    assert result.exit_code == 0, result.output
    assert (answers.parent / "queries-001.png").is_file() and (answers.parent / "README.txt").is_file()
    lines = answers.read_text().splitlines()
    assert lines[0] == "image_id,class,answer" and len(lines) == 7 and all(l.endswith(",") for l in lines[1:])
    answers.write_text("\n".join([lines[0]] + [l + ("yes" if i % 2 else "no") for i, l in enumerate(lines[1:])]) + "\n")
    result = CliRunner().invoke(app, ["train", str(run_config), "--method", "slim", *slim_args])
    assert result.exit_code == 0, result.output
    slim_run = [r for r in json.loads((workdir / "robust.json").read_text())["runs"] if r["method"] == "slim"][0]
    assert slim_run["budget"] == {"answers": 6} and slim_run["selection"] == "none: last-layer fit"

    # CLARIFY: the person types two phrases for the first class, sets tau for one, keeps the best; skips the rest.
    typed = "snow\nsled @ 0.05\n\nskip\nskip\n"
    result = CliRunner().invoke(app, ["clarify", str(run_config)], input=typed)
    assert result.exit_code == 0, result.output
    assert "error score" in result.output and "kept:" in result.output
    montages = sorted((workdir / "clarify").glob("montage-*.png"))
    assert [m.stem for m in montages] == ["montage-bird", "montage-car", "montage-dog"]
    saved = (workdir / "clarify" / "annotations.yaml").read_text()
    assert saved.count("- class:") == 1 and ("phrase: snow" in saved or "phrase: sled" in saved)
    result = CliRunner().invoke(app, ["train", str(run_config), "--method", "clarify"])
    assert result.exit_code == 0, result.output
    clarify_run = [r for r in json.loads((workdir / "robust.json").read_text())["runs"] if r["method"] == "clarify"][0]
    assert clarify_run["budget"] == {"phrases": 1} and "no group labels" in clarify_run["selection"]
    assert "CLARIFY (original): annotation budget 1 phrases" in (workdir / "robust.md").read_text()


def test_status_needs_neither_prefect_nor_model_files(run_config, tmp_path):
    """`aspire status` in a fresh process, Prefect's API pointed at a closed port, LAMA_MODEL unset: it answers
    from the markers, and names what it cannot key instead of crashing."""
    run(run_config, until="extract")
    env = {k: v for k, v in os.environ.items() if k != "LAMA_MODEL"}
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # nothing listens: any call to Prefect would fail
    done = subprocess.run([sys.executable, "-m", "flows.cli", "status", str(run_config), "--set", "remove.inpaint=lama"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert all("done" in lines[s] for s in ("ingest", "classifier", "holdout", "caption", "extract")), done.stdout
    assert "unknown" in lines["remove"] and "LAMA_MODEL" in lines["remove"] and "waiting" in lines["retrain"]


def test_shard_tasks_retry_transient_errors_but_not_input_mistakes():
    """A missing file fails at once (a retry would fail the same way and double the wait); a RuntimeError (CUDA out
    of memory, say) gets the task's one retry."""
    from prefect import flow, task

    from tasks import retry_if_transient

    calls = {"missing": 0, "transient": 0}

    @task(retries=1, retry_condition_fn=retry_if_transient)
    def failing(kind: str) -> None:
        calls[kind] += 1
        raise FileNotFoundError("no such model") if kind == "missing" else RuntimeError("CUDA out of memory")

    @flow
    def both() -> None:
        for kind in calls:
            failing(kind, return_state=True)

    both()
    assert calls == {"missing": 1, "transient": 2}


def test_the_gpu_tag_stays_only_on_tasks_that_run_on_cuda():
    from flows.stages import on_gpu
    from tasks import classifier, remove

    assert "gpu" in remove.remove_shard_task.tags
    assert "gpu" not in on_gpu(remove.remove_shard_task, "cpu", "cpu").tags
    assert "gpu" not in on_gpu(remove.remove_shard_task).tags  # weight-free backends: no device at all
    assert "gpu" in on_gpu(classifier.train_task, "cpu", "cuda:0").tags


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "Ctrl-C"])
def test_stopping_the_cli_leaves_no_prefect_server_running(run_config, tmp_path, how):
    """SIGKILL of the CLI's own process (not its group) used to orphan Prefect's temporary API server, and so, at
    times, did SIGTERM. Ctrl-C in a terminal (SIGINT to the whole job, server included) stopped the server at
    once while the CLI retried it for minutes, printing tracebacks; now the CLI says so in one line and exits 130
    within seconds, and Prefect stops its server."""
    import signal

    from flows.cli import INTERRUPTED

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own temporary server, not the tests' one
    log = tmp_path / "cli.log"
    with open(log, "w") as out:  # its own process group, as a terminal's foreground job
        # SIGINT as a terminal's job has it, even when the tests run as a background job (which ignores it)
        cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "classifier", str(run_config)], env=env,
                               stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def server_pids() -> set[int]:
        pids = set()
        for pid in Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split():
            if "prefect.server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.add(int(pid))
        return pids

    def running(pid: int) -> bool:
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]

    deadline, servers = time.monotonic() + 120, set()
    while not servers and time.monotonic() < deadline and cli.poll() is None:
        time.sleep(0.5)
        servers = server_pids()
    assert servers, log.read_text()
    while "Beginning subflow run 'classifier'" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)  # stopped inside a stage's flow run, as a user stops a long run
    time.sleep(1.0)  # the watchdog lists the CLI's children twice a second
    if how == "Ctrl-C":
        os.killpg(cli.pid, signal.SIGINT)  # what the terminal does: every process of the foreground job
        try:
            status = cli.wait(timeout=60)
        finally:
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
        text = log.read_text()
        assert status == 130 and text.strip().splitlines()[-2:].count(INTERRUPTED) == 1, text[-3000:]
        assert "Traceback" not in text and "Connection refused" not in text, text[-3000:]
    else:
        cli.send_signal(getattr(signal, how))
        cli.wait()
    deadline = time.monotonic() + 20
    while any(running(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(running(pid) for pid in servers), "Prefect's server outlived the stopped CLI"


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_resumes(run_config, tmp_path, monkeypatch):
    """ENOSPC while the classifier's shards are written: exit 1 with one line, no traceback, ingest stays committed,
    nothing of the classifier is marked done; once space is back the same command resumes (issue 16, suite 5)."""
    import errno

    import aspire.cache
    from flows.cli import app

    real = aspire.cache.write_jsonl

    def full_in_classifier(rows, path):
        if "/classifier/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(rows, path)

    monkeypatch.setattr(aspire.cache, "write_jsonl", full_in_classifier)
    result = CliRunner().invoke(app, ["stage", "holdout", str(run_config)])
    assert result.exit_code == 1, result.output
    assert "stopped: the disk is full writing" in result.output and "rerun the same command" in result.output
    assert "Traceback" not in result.output
    workdir = tmp_path / "run"
    assert list((workdir / "ingest").glob("*/DONE.json"))
    assert [p.parent.name for p in (workdir / "classifier").rglob("DONE.json")] == ["model"]  # trained, no shard
    assert not list(workdir.rglob("*.tmp-*"))
    monkeypatch.setattr(aspire.cache, "write_jsonl", real)
    result = CliRunner().invoke(app, ["stage", "holdout", str(run_config)])
    assert result.exit_code == 0, result.output
    assert summary(workdir, "ingest")["rows_out"] > 0 and summary(workdir, "holdout")["holdout"] > 0


def test_a_benchmark_draw_that_fails_leaves_no_half_drawn_folder(tmp_path, monkeypatch):
    """A full disk while the synthetic benchmark is drawn: the error reaches the caller and the half-drawn temporary
    folder is gone (bench/disk_full.py found one left behind)."""
    import errno

    from prefect import flow

    import flows.aspire
    from aspire.config import RunConfig

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(flows.aspire, "draw_background_bank", full)
    config = RunConfig(workdir=tmp_path / "run", dataset={"format": "hf-imagefolder", "root": tmp_path / "benchmark"},
                       synth=SMALL | {"train_per_class": 2})

    @flow(name="draw-benchmark")
    def draw():
        flows.aspire.ensure_benchmark(config)

    with pytest.raises(OSError, match="No space left"):
        draw()
    assert not (tmp_path / "benchmark").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_nothing_claimed_in_any_class_generates_nothing_but_the_control_still_does(run_config, tmp_path):
    """The negative control's case: when the report claims no spurious feature for any class there is nothing to
    augment against, and ASPIRE generates nothing (saying why); augmentation without discovery still generates."""
    from flows.stages import NOTHING_CLAIMED

    report = run(run_config, "collapse.min_flips=100000")
    assert report["no_spurious_found"] == ["bird", "car", "dog"] and report["counts"]["generated"] == 0
    generated = summary(tmp_path / "run", "generate")
    assert generated["generated"] == 0 and generated["skipped"] == {c: NOTHING_CLAIMED for c in ("bird", "car", "dog")}
    # the augmented set is the original one: the model before stands (another seed would only measure the seed)
    retrained = summary(tmp_path / "run", "retrain")
    assert retrained["kept_model_before"] and not retrained["trained"]
    assert report["after"] == report["before"] and report["worse_groups"] == {}
    assert "After = before: nothing was generated" in (tmp_path / "run" / "report.md").read_text()
    control = run(run_config, "collapse.min_flips=100000", "generate.learn_from=held-out")
    assert control["counts"]["generated"] > 0


def test_stage_task_runs_keep_their_own_tags_and_progress_advances_without_a_terminal(tmp_path, monkeypatch):
    """The run's labels stay on the flow runs (each tagged task run costs two concurrency API calls), a task's own
    tag stays on it; and the stage's progress artifact moves shard by shard when stderr is not a terminal (a disabled
    tqdm bar does not count)."""
    from prefect import flow, tags, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    from prefect.context import get_run_context

    import flows.running as running
    from aspire.cache import ShardResult, StageStore
    from flows.runtime import make_task_runner
    from aspire.config import RunnerConfig

    @task(name="tagged-shard", tags=["own-tag"])
    def shard(store, index, rows):
        return store.ensure_shard(index, rows, lambda part, _: ShardResult(part, [], {}))

    progress: list[float] = []
    real_update = running.update_progress_artifact
    monkeypatch.setattr(running, "update_progress_artifact", lambda a, p: (progress.append(p), real_update(a, p)))
    monkeypatch.setattr(running, "PROGRESS_EVERY_S", 0.0)
    store = StageStore(tmp_path / "run", "tagged", "k1")
    rows = [{"image_id": f"img{i}"} for i in range(6)]

    @flow(name="tags-outer")
    def outer():
        with make_task_runner(RunnerConfig(kind="threads", n_workers=1)) as runner:
            running.as_stage_flow("tagged", lambda: running.run_shards(runner, store, rows, shard, 2))
        return get_run_context().flow_run.id

    with tags("run-label"):
        outer_id = outer()
    with get_client(sync_client=True) as client:
        outer_run = client.read_flow_run(outer_id)
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [outer_id]}),
                                         sort=FlowRunSort.ID_DESC, limit=10)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[s.id for s in subflows])),
                                          sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=10)
    assert "run-label" in outer_run.tags and all("run-label" in s.tags for s in subflows)
    assert len(task_runs) == 3 and all(set(t.tags) == {"own-tag"} for t in task_runs)
    assert progress[:-1] == pytest.approx([100 / 3, 200 / 3, 100.0]) and progress[-1] == 100.0


def test_several_generate_multiples_are_compared_on_validation_and_the_best_is_tested(run_config, tmp_path):
    """generate.per_class [0.5, 0.25]: the larger multiple is generated, one model per multiple trains on each
    class's first generated images, and the best on validation (worst group, then average, then the smaller
    multiple) is the one tested and reported; `aspire train` reads the same images back from the export. On a
    synthetic benchmark the report also says which cue the models before and after follow on the cue probe."""
    from aspire.config import load_config
    from flows.train import committed

    config = yaml.safe_load(run_config.read_text()) | {"synth": SMALL}  # drawn by the run (its bad images go)
    run_config.write_text(yaml.safe_dump(config))
    sets = ("generate.learn_from=held-out", "generate.per_class=[0.5,0.25]")  # the control always generates
    report = run(run_config, *sets)
    synth = SynthConfig(**SMALL)
    probed = len(synth.classes) * len(synth.backgrounds) * (len(synth.objects) + 1) * 8
    assert set(report["cues"]) == {"before", "after"} and report["cues"]["after"]["images"] == probed
    assert all(0 <= report["cues"][m][c] <= 1 for m in ("before", "after") for c in ("shape", "background", "object"))
    choice = report["per_class"]
    lines = choice["choices"]
    assert [c["per_class"] for c in lines] == [0.25, 0.5]
    assert 0 < lines[0]["generated"] < lines[1]["generated"] == report["counts"]["generated"]
    best = max(lines, key=lambda c: (c["val_worst_group_acc"], c["val_avg_acc"]))  # max keeps the first of ties
    assert choice["chosen"] == best["per_class"]
    (key_dir,) = [p for p in (tmp_path / "run" / "retrain").iterdir() if (p / "DONE.json").is_file()]
    assert (key_dir / "model-x0.25" / "model.pt").is_file() and (key_dir / "model-x0.5" / "model.pt").is_file()
    sharded = [json.loads(line) for shard in sorted(key_dir.glob("shard-*")) for line in open(shard / "rows.jsonl")]
    assert {r["split"] for r in sharded} == {"test"}  # the chosen model's val predictions are reused, not redone
    augmented = committed(load_config(run_config, list(sets))).datasets["augmented"]
    used = [r for r in augmented if r["source"] == "generated"]
    assert len(used) == best["generated"] == report["counts"]["generated_used"]
    assert all(r["per_class_from"] <= best["per_class"] for r in used)
    originals = sum(r["split"] == "train" and r["source"] == "original" for r in augmented)
    assert summary(tmp_path / "run", "retrain")["train_rows"] == originals + best["generated"]
    assert "chosen on validation" in (tmp_path / "run" / "report.md").read_text()
    assert "Which cue the model follows" in (tmp_path / "run" / "report.md").read_text()
    again = run(run_config, *sets)
    assert again["stages"]["retrain"]["cached"] and again["per_class"] == choice and again["after"] == report["after"]
