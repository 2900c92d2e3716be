"""``aspire train``: robust trainers (ERM, JTT, DFR, Group DRO, CLARIFY, SLIM) on the original and the augmented training set,
evaluated per group on the test split, averaged over seeds (the kind of table ASPIRE's Table 1 reports).

It reads what ``aspire run`` committed: the dataset rows (``holdout`` stage) and, when there, the augmented set
(``export`` stage). Each (method, seed, data) result is a committed part, so a rerun trains nothing twice.
Groups: the dataset's labels, or for datasets without them (``retrain.groups``) class x the run's top-k spurious
phrase group each caption mentions (:mod:`aspire.groups`); generated rows get one new group per class
(``augmented:<class>``), so Group DRO and DFR see them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from aspire.cache import StageStore, file_digest, stage_key
from aspire.config import ClassifierConfig, RunConfig, load_config
from aspire.manifest import Row, digest
from aspire.report import attach_robust, render_robust
from aspire.robust import evaluate, make_trainer
from flows.keys import chain
from flows.running import artifact_key
from flows.runtime import project_logging
from tasks import classifier, ingest, quote
from tasks.export import with_generated_groups
from tasks.generate import with_multiple
from tasks.retrain import group_rows

METHODS = ("erm", "jtt", "dfr", "groupdro", "clarify", "slim")
RESULT = "result.json"


@dataclass
class Committed:
    """What ``aspire run`` committed that training needs.

    Attributes:
        datasets: ``original`` (the holdout stage's rows) and, when committed, ``augmented`` (the export stage's;
            with several ``generate.per_class`` multiples, the images of the one the retrain stage chose, or of the
            smallest before retraining).
        spurious: the collapse stage's top-k phrase groups per class, or ``None``.
        captions: the caption stage's rows (held-out images with their captions), or empty.
        erm_model: the classifier stage's ERM model file (DFR's backbone with ``retrain.dfr_base=classifier``, the
            reference model of CLARIFY and SLIM).
        phrases: the extract stage's object and background phrases, in order of first appearance (the simulated
            CLARIFY annotator's candidates).
    """

    datasets: dict[str, list[Row]]
    spurious: dict[str, list[list[str]]] | None
    captions: list[Row]
    erm_model: str | None = None
    phrases: list[str] = field(default_factory=list)


def committed(config: RunConfig) -> Committed:
    """Read the committed stages of the run.

    Raises:
        ValueError: the holdout stage is not committed.
    """
    found = Committed({}, None, [])
    chosen = None
    for name, store in chain(config, ingest.list_dataset(config)):
        marker = store.stage_marker()
        if marker is None:
            break
        if name == "classifier":
            found.erm_model = str(classifier.model_file(store))
        if name == "holdout":
            found.datasets["original"] = store.read_rows()
        if name == "caption":
            found.captions = store.read_rows()
        if name == "extract":
            found.phrases = list(dict.fromkeys(p for row in store.read_rows()
                                               for p in [*row.get("foreground", []), row.get("background")] if p))
        if name == "collapse":
            found.spurious = marker["summary"]["spurious"]
        if name == "export":
            found.datasets["augmented"] = store.read_rows()
        if name == "retrain":
            chosen = (marker["summary"].get("per_class") or {}).get("chosen")
    if "augmented" in found.datasets:  # several generate.per_class multiples: the one the retrain stage chose
        multiples = {r["per_class_from"] for r in found.datasets["augmented"]
                     if r.get("source") == "generated" and r.get("per_class_from") is not None}
        if multiples:
            found.datasets["augmented"] = with_multiple(found.datasets["augmented"], chosen or min(multiples))
    if "original" not in found.datasets:
        raise ValueError(f"{config.workdir}: the holdout stage is not committed; run `aspire run` (or "
                         "`aspire stage holdout`) first")
    return found


@task(name="train-method", task_run_name="train-{method}-seed{seed}-{data}", tags=["gpu"], cache_policy=NO_CACHE)
def train_task(store: StageStore, method: str, seed: int, data: str, rows: list[Row], config: ClassifierConfig,
               trainer_args: dict) -> dict:
    """Train one method on one seed, evaluate on test; committed as a part (a rerun reads it back)."""
    def write(tmp):
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] == "val"]
        result = make_trainer(method, **trainer_args).train(train, val, config, seed)
        test = evaluate(result.model, [r for r in rows if r["split"] == "test" and r.get("source") != "generated"], config)
        record = {"method": method, "seed": seed, "data": data, "best_epoch": result.best_epoch, "test": test,
                  **{k: result.extras[k] for k in ("budget", "selection", "annotations") if k in result.extras}}
        (tmp / RESULT).write_text(json.dumps(record, indent=1))
        return {}

    name = f"{method}-seed{seed}-{data}-{digest(trainer_args)[:8]}"  # each setting its own part: controls coexist
    annotations = Path(trainer_args.get("annotations") or "")
    edited = file_digest(annotations) if trainer_args.get("annotator") == "file" and annotations.is_file() else None
    store.ensure_part(name, write, digest([trainer_args, digest(rows), edited]), checked_files=(RESULT,))
    return json.loads((store.part_dir(name) / RESULT).read_text())


def summarize(records: list[dict]) -> list[dict]:
    """One line per (method, data): mean and spread (population std) over seeds of test average and worst-group
    accuracy, and the mean accuracy of every test group."""
    lines = []
    for method in METHODS:
        for data in ("original", "augmented"):
            runs = [r for r in records if r["method"] == method and r["data"] == data]
            mine = [r["test"] for r in runs]
            if not mine:
                continue
            avg, worst = [m["avg_acc"] for m in mine], [m["worst_group_acc"] for m in mine]
            groups = list(dict.fromkeys(g for m in mine for g in m["per_group"]))
            per_group = {g: round(statistics.mean(m["per_group"][g] for m in mine if g in m["per_group"]), 4)
                         for g in groups}
            lines.append({"method": method, "data": data, "seeds": len(mine),
                          "avg_acc": round(statistics.mean(avg), 4), "avg_std": round(statistics.pstdev(avg), 4),
                          "worst_group_acc": round(statistics.mean(worst), 4),
                          "worst_std": round(statistics.pstdev(worst), 4), "per_group": per_group,
                          **{k: runs[0][k] for k in ("budget", "selection") if k in runs[0]}})
    return lines


@flow(name="aspire-train")
def train_flow(config_path: str, overrides: list[str] | None = None, methods: list[str] | None = None,
               seeds: list[int] | None = None) -> list[dict]:
    """Train every method on every seed, on the original and (when exported) the augmented set.

    Writes ``<workdir>/robust.json`` and ``robust.md``, adds the table to the run's report, publishes a Prefect
    table artifact; returns the table lines.
    """
    project_logging()
    config = load_config(config_path, overrides)
    methods, seeds = methods or ["erm"], seeds or [0]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--method {unknown[0]!r}: expected one of {METHODS}")
    found = committed(config)
    records, grouping = [], {}
    for data, rows in found.datasets.items():
        store = StageStore(config.workdir, "train", stage_key("train", 1, config.classifier.model_dump(mode="json",
                           exclude={"device", "num_workers"}), "robust", digest(rows)))
        rows, grouping[data] = group_rows(store, rows, config.retrain, config.caption, found.spurious, found.captions)
        rows = with_generated_groups(rows)
        get_run_logger().info("%s data: groups from %s %s", data, grouping[data]["groups"],
                              grouping[data].get("group_sizes", ""))
        for method in methods:
            for seed in seeds:
                records.append(train_task(store, method, seed, data, quote(rows), config.classifier,
                                          config.retrain.trainer_args(method, found.erm_model, config.workdir,
                                                                      found.phrases)))
                get_run_logger().info("%s seed %d on %s: test %s", method, seed, data, records[-1]["test"]["worst_group_acc"])
    lines = summarize(records)
    robust = {"lines": lines, "grouping": grouping}
    (config.workdir / "robust.json").write_text(json.dumps({**robust, "runs": records}, indent=1))
    (config.workdir / "robust.md").write_text("\n".join(render_robust(robust)) + "\n")
    attach_robust(config.workdir, robust)
    table = [{k: v for k, v in line.items() if k != "per_group"} for line in lines]
    create_table_artifact(table, key=artifact_key(config, "robust"), description="Robust trainers, test split")
    return lines
