"""The correction methods on the suite's draws: ERM, JTT, DFR, Group DRO, CLARIFY and SLIM, on the small CNN from
scratch and on the synthetic-pretrain backbone, with the controls of the same annotation budget.

Usage: .venv/bin/python bench/correction_methods.py [--root DIR] [--draws d01_demo,d03_four_classes]
       [--seeds 0,1,2] [--backbones pretrained,scratch] [--arms erm,dfr,...]

Per draw (``configs/suite/``, the demo's settings), backbone and seed s, ``aspire run`` with ``classifier.seed=s``
goes as far as the extract stage (the reference ERM model, a different one per seed, and the extracted phrases that
CLARIFY's simulated annotator chooses from), then ``aspire train`` runs each arm with seed s on the original
training set:

- ``erm``, ``jtt``, ``dfr`` (the run's ERM model as backbone), ``groupdro`` (true group labels, the upper reference);
- ``clarify``: the simulated annotator (per class the extracted phrase with the best error score), last layer;
  ``clarify-random``: a random extracted phrase per class, tau by the score (the same budget: one phrase per class);
  ``clarify-2`` / ``clarify-random-2``: the same with a follow-up phrase per class (``retrain.clarify_phrases=2``);
- ``slim``: SLIM_Val with the simulated annotator (GradCAM mass in the object box, 5% answers flipped);
  ``slim-random``: a random validation subset of the curated size, the same last-layer training; both at the
  paper's budget of 0.1x the validation set and at 0.3x (the top of the paper's range; these draws have 24-60
  groups in 240-600 validation images, so 0.1x leaves most groups unseen).

Every (method, seed, setting) result is a committed part, so a rerun resumes. Results: ``<root>/corrections.json``
and ``<root>/corrections.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from suite import SUITE, draw_config  # bench/suite.py: the draws and their configs
from flows.runtime import prefect_defaults

REPO = Path(__file__).resolve().parents[1]
BACKBONES = {"pretrained": ["classifier.weights=synthetic-pretrain"], "scratch": []}
COMMON = ["retrain.dfr_base=classifier", "retrain.clarify_annotator=simulated", "retrain.slim_annotator=simulated"]
ARMS = {  # name -> (trainer method, extra overrides)
    "erm": ("erm", []), "jtt": ("jtt", []), "dfr": ("dfr", []), "groupdro": ("groupdro", []),
    "clarify": ("clarify", []), "clarify-random": ("clarify", ["retrain.clarify_annotator=random"]),
    "clarify-2": ("clarify", ["retrain.clarify_phrases=2"]),
    "clarify-random-2": ("clarify", ["retrain.clarify_annotator=random", "retrain.clarify_phrases=2"]),
    "slim": ("slim", []), "slim-random": ("slim", ["retrain.slim_annotator=random"]),
    "slim-0.3": ("slim", ["retrain.slim_budget=0.3"]),
    "slim-random-0.3": ("slim", ["retrain.slim_annotator=random", "retrain.slim_budget=0.3"]),
}
SCRATCH_ARMS = ("erm", "jtt", "dfr", "groupdro", "clarify", "slim")


def run(draws: list[Path], seeds: list[int], backbones: list[str], root: Path, arms: list[str]) -> dict:
    from flows.aspire import aspire_flow
    from flows.train import train_flow

    results_file = root / "corrections.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for draw in draws:
        config_path = draw_config(draw, root)
        for backbone in backbones:
            for seed in seeds:  # seed-major: a shortened run still has every arm of the first seeds
                todo = [arm for arm in ARMS if arm in arms and (backbone != "scratch" or arm in SCRATCH_ARMS)
                        and f"{draw.stem}/{backbone}/{arm}/{seed}" not in results]
                if not todo:
                    continue
                overrides = [*BACKBONES[backbone], *COMMON, f"classifier.seed={seed}"]  # the reference model varies too
                start = time.perf_counter()
                aspire_flow(config_path=str(config_path), overrides=overrides, until="extract")
                print(f"{draw.stem}/{backbone}/seed {seed}: reference model and extraction in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                for arm in todo:
                    method, extra = ARMS[arm]
                    key = f"{draw.stem}/{backbone}/{arm}/{seed}"
                    start = time.perf_counter()
                    lines = train_flow(config_path=str(config_path), overrides=[*overrides, *extra], methods=[method],
                                       seeds=[seed])
                    line = next(l for l in lines if l["data"] == "original")
                    results[key] = {k: line.get(k) for k in ("avg_acc", "worst_group_acc", "budget")}
                    results[key]["minutes"] = round((time.perf_counter() - start) / 60, 2)
                    results_file.write_text(json.dumps(results, indent=1))
                    print(key, json.dumps(results[key]), flush=True)
    return results


def _cell(runs: list[dict], key: str) -> str:
    if not runs:
        return "–"
    values = [100 * r[key] for r in runs]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def table(results: dict, draws: list[Path], seeds: list[int], backbones: list[str]) -> str:
    """Markdown: per draw and backbone, worst-group / average test accuracy of every arm (mean ± std over seeds)."""
    lines = ["| draw | backbone | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for draw in draws:
        for backbone in backbones:
            cells = []
            for arm in ARMS:
                runs = [results[k] for s in seeds if (k := f"{draw.stem}/{backbone}/{arm}/{s}") in results]
                cells.append(f"{_cell(runs, 'worst_group_acc')} / {_cell(runs, 'avg_acc')} (n={len(runs)})"
                             if runs else "–")
            lines.append(f"| {draw.stem} | {backbone} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "corrections")
    parser.add_argument("--draws", default="d01_demo,d03_four_classes,d06_made_up_words_08")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbones", default="pretrained,scratch")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    args = parser.parse_args()
    draws = [SUITE / f"{name}.yaml" for name in args.draws.split(",")]
    missing = [d for d in draws if not d.is_file()]
    if missing:
        raise SystemExit(f"--draws: no such draw {missing[0].stem!r} in {SUITE}")
    seeds = [int(s) for s in args.seeds.split(",")]
    backbones = args.backbones.split(",")
    args.root.mkdir(parents=True, exist_ok=True)
    prefect_defaults()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    results = run(draws, seeds, backbones, args.root.resolve(), arms)
    text = table(results, draws, seeds, backbones)
    (args.root / "corrections.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
