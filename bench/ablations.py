"""ASPIRE's Table 2 ablations, in kind, on the CPU world: each step switched off or replaced, several seeds.

Usage: .venv/bin/python -m bench.ablations [--root DIR] [--draws d01_demo] [--seeds 0,1,2]

Per draw of ``configs/suite/`` (the demo's settings, see ``bench/suite.py``) and seed (``generate.seed`` and
``retrain.seed``), the arms are the full pipeline and, as in ASPIRE's Table 2:

- ``no-remove``: without object removal (step 4a: ``remove.enabled=false``);
- ``no-background``: without background edits (step 4b: ``background.enabled=false``);
- ``edits``: training on the kept edits themselves instead of generated images (``generate.backend=edits``);
- ``0.5x`` / ``3x``: the amount of augmentation (``generate.per_class``; the demo's 1x is the full arm).

Every arm shares the stages it does not change through the stage cache; a rerun resumes (``<root>/ablations.json``).
The markdown table goes to ``<root>/ablations.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.suite import SUITE, _mean_std, _pct, run_suite
from flows.runtime import prefect_defaults

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "full": [],
    "no-remove": ["remove.enabled=false"],
    "no-background": ["background.enabled=false"],
    "edits": ["generate.backend=edits"],
    "0.5x": ["generate.per_class=0.5"],
    "3x": ["generate.per_class=3.0"],
}


def table(results: dict, draws: list[Path], seeds: list[int]) -> str:
    lines = ["| draw | arm | seeds | edits kept | images added | worst group | average |", "|---|---|---|---|---|---|---|"]
    for draw in draws:
        first = next((results[k] for k in (f"{draw.stem}/full/{s}" for s in seeds) if k in results), None)
        if first is not None:
            lines.append(f"| {draw.stem} | no augmentation (ERM) | - | - | 0 | {_pct(first['before']['worst_group_acc'])} "
                         f"| {_pct(first['before']['avg_acc'])} |")
        for arm in ARMS:
            runs = [results[f"{draw.stem}/{arm}/{s}"] for s in seeds if f"{draw.stem}/{arm}/{s}" in results]
            if runs:
                lines.append(f"| {draw.stem} | {arm} | {len(runs)} | {runs[0]['edits_kept']} | {runs[0]['generated']} "
                             f"| {_mean_std([r['after']['worst_group_acc'] for r in runs])} "
                             f"| {_mean_std([r['after']['avg_acc'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "ablations")
    parser.add_argument("--draws", default="d01_demo", help="comma-separated draw names of configs/suite")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    wanted = args.draws.split(",")
    draws = [d for d in sorted(SUITE.glob("*.yaml")) if d.stem in wanted]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.root.mkdir(parents=True, exist_ok=True)
    prefect_defaults()
    results = run_suite(draws, seeds, args.root.resolve(), ARMS, "ablations.json")
    text = table(results, draws, seeds)
    (args.root / "ablations.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
