"""The benchmark suite: ASPIRE and its controls on every draw of ``configs/suite/``.

Usage: .venv/bin/python bench/suite.py [--root DIR] [--draws d01_demo,n01_no_correlation] [--seeds 0,1,2]
       [--ceiling | --ceiling-only] [--set classifier.epochs=18 ...] [--arms aspire] [--results NAME.json]
       [--fresh N --fresh-seed S] [--tables-only]

Each draw is ``configs/demo.yaml`` (the demo's settings, untouched) with the draw's ``synth`` section. Per draw
and seed (``generate.seed`` and ``retrain.seed``) three arms are compared on the test split:

- (a) no augmentation: the ERM classifier of the run (the report's ``before``);
- (b) augmentation without discovery: the same generator and the same number of images, imitating the class's
  held-out originals instead of its kept edits (``generate.learn_from=held-out``: it avoids nothing);
- (c) ASPIRE: the generator imitates the kept edits of the class's spurious groups.

With ``--ceiling``, also what this classifier reaches when the data has no shortcut at all: ERM (the classifier
stage, same settings) on the draw redrawn with every training group balanced as the test split is (background
uniform, the class's object in half of the images, no other class's object) and twice the training images, as
many as (c) trains on (originals + 1x generated). A draw whose ceiling stays low is one where the classifier and
its training budget, not discovery, bound what any augmentation can show.

With ``--fresh N``, the suite runs N draws nobody has seen instead (:func:`fresh_draw`): made-up names for
every class, object and background, checked against every word of the repository, 3-6 classes, random shapes,
colours, textures, strengths (0.95, 0.9, 0.8), image size (64, 96) and train size, all from ``--fresh-seed``;
their configs are written to ``<root>/fresh-<seed>/`` first, so they can be read before the results.

Beside the test split, every run's models meet the draw's *cue probe* (:func:`probe`): each class's core shape
on every background, with no object or with each object, so cues disagree in ways the test groups never show (a
penguin beside the scooter's helmet on the hornet's hedge). It says how often a model follows the shape, and how
often another class's planted background or object instead; the third table of the markdown. The second counts
each arm's test groups more than 5 points worse after augmentation by what the report says they are (right
before only from their context, lost to a new or a kept shortcut; :func:`worse_table`).

(b) and (c) share every stage up to ``generate`` through the stage cache, and a rerun of the suite resumes from
what is committed (``<root>/<draw>/``). Results go to ``<root>/suite.json`` and markdown tables to
``<root>/suite.md`` (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aspire.config import load_config
from aspire.metrics import lost_images
from aspire.report import where_lost
from aspire.synth import CORE_COLOR, SynthConfig, planted_found
from flows.runtime import prefect_defaults, start_prefect

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "configs" / "suite"
ARMS = {"aspire": [], "no-discovery": ["generate.learn_from=held-out"]}


SHAPES = ["circle", "triangle", "square", "diamond", "star", "cross", "hexagon"]
TEXTURES = ["noise", "hstripes", "vstripes", "waves", "dots", "checker"]
PLACES = ["in the {}", "on a {}", "at the {}", "near a {}", "by the {}", "across a {}", "inside the {}", "over the {}"]


def repository_words() -> set[str]:
    """Every lower-case word of the files the pipeline or its tests could read (code, configs, prompts, test data).

    Markdown is left out: no stand-in reads it, and BENCHMARKS.md gains a fresh draw's names once its results are
    written, which would make the same ``--fresh-seed`` draw other names (and, before, other settings too)."""
    words: set[str] = set()
    for path in REPO.rglob("*"):
        if path.is_file() and ".git" not in path.parts and ".venv" not in path.parts and path.suffix in (
                ".py", ".yaml", ".yml", ".txt", ".json", ".jsonl", ".csv", ".toml"):
            words |= set(re.findall(r"[a-z]+", path.read_text(errors="replace").lower()))
    return words


def made_up_word(rng: np.random.Generator, taken: set[str]) -> str:
    """A pronounceable word of 2-3 syllables not in ``taken`` (which it joins)."""
    while True:
        syllables = int(rng.integers(2, 4))
        word = "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(syllables))
        word += rng.choice(["", "n", "r", "l", "k", "m"])
        if word not in taken:
            taken.add(word)
            return word


def fresh_draw(seed: int, taken: set[str]) -> dict:
    """A draw's ``synth`` section that nobody has seen: 3-6 classes of one colour (shape tells them apart, as in
    every suite draw), a planted object and background per class and one or two spare backgrounds, all named by
    made-up words not in ``taken``; strength 0.95, 0.9 or 0.8, 64 or 96 px, 300-500 training images per class.

    Each name comes from a random stream of its own: a word found in ``taken`` changes that name only, never the
    other names or the draw's settings (classes, shapes, colours, strength, size)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 7))
    n_backgrounds = min(n + int(rng.integers(1, 3)), 8)
    classes, objects, places, adjectives = ([made_up_word(np.random.default_rng([seed, kind, i]), taken) for i in range(k)]
                                            for kind, k in enumerate((n, n, n_backgrounds, 3), start=1))
    strength = float(rng.choice([0.95, 0.9, 0.8]))

    def colour() -> list[int]:
        return [int(c) for c in rng.integers(20, 240, size=3)]

    def article(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    shapes = [str(s) for s in rng.permutation(SHAPES)[:n]]
    backgrounds = []
    for i, name in enumerate(places):
        base = np.array(colour())
        prepositions = rng.choice(PLACES, size=3, replace=False)
        backgrounds.append({"name": name, "texture": TEXTURES[i % len(TEXTURES)],
                            "colors": [[int(c) for c in base], [int(c) for c in np.clip(base + rng.integers(-50, 51, 3), 0, 255)]],
                            "words": [p.format(name) for p in prepositions]})
    return {
        "seed": int(rng.integers(100, 10_000)), "image_size": int(rng.choice([64, 96])),
        "train_per_class": int(rng.choice([300, 400, 500])),
        "background_strength": strength, "object_strength": strength,
        "classes": [{"name": name, "shape": shape, "color": list(CORE_COLOR),
                     "words": [article(name), f"two {name}s", f"{article(adjectives[i % 3])} {name}"],
                     "background": places[i], "object": objects[i]}
                    for i, (name, shape) in enumerate(zip(classes, shapes))],
        "objects": [{"name": name, "shape": str(rng.choice(SHAPES)), "color": colour(),
                     "words": [article(name), f"{article(adjectives[(i + 1) % 3])} {name}", f"the {name}"]}
                    for i, name in enumerate(objects)],
        "backgrounds": backgrounds,
    }


def write_fresh_draws(count: int, seed: int, root: Path) -> list[Path]:
    """``count`` fresh draws (see :func:`fresh_draw`) as draw files under ``root/fresh-<seed>/``.

    A draw file already there is kept, not drawn again: a name may change when the code, configs or prompts gain
    that very word (:func:`repository_words`), and a rerun on the same root must run the same draw."""
    folder = root / f"fresh-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    taken = repository_words()
    paths = []
    for i in range(count):
        path = folder / f"f{seed}_{i:02d}.yaml"
        if path.is_file():
            paths.append(path)
            continue
        synth = fresh_draw(seed * 1000 + i, taken)
        SynthConfig.model_validate(synth)  # a draw that does not validate is a bug here, not a result
        path.write_text(f"# fresh draw {i} of --fresh-seed {seed}: {len(synth['classes'])} classes, strength "
                        f"{synth['background_strength']}, {synth['image_size']} px\n" + yaml.safe_dump({"synth": synth}, sort_keys=False))
        paths.append(path)
    return paths


def draw_config(draw: Path, root: Path) -> Path:
    """The demo config with the draw's sections merged in, its paths under ``root/<draw>``; returns its file."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for section, values in (yaml.safe_load(draw.read_text()) or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return write_config(config, root / draw.stem)


def write_config(config: dict, workdir: Path) -> Path:
    """``config`` with its workdir, benchmark and background bank under ``workdir``, saved there; returns its file."""
    config.update(workdir=str(workdir))
    config["dataset"]["root"] = str(workdir / "benchmark")
    config["background"]["bank"] = str(workdir / "benchmark" / "backgrounds")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def balanced_config(config_path: Path) -> Path:
    """The draw's config redrawn without a shortcut (see the module doc), in its own workdir beside the draw's."""
    config = yaml.safe_load(config_path.read_text())
    synth = load_config(config_path).synth
    config["synth"] = {**config["synth"], "background_strength": 1 / len(synth.backgrounds), "object_strength": 0.5,
                       "other_object_rate": 0.0, "train_per_class": 2 * synth.train_per_class}
    return write_config(config, config_path.parent.with_name(config_path.parent.name + "-balanced"))


def summarise(report: dict, seconds: float, synth: SynthConfig) -> dict:
    """What the table shows of one run."""
    planted = report.get("planted_found") or {}  # among the claimed features
    top_k = report.get("top_k") or {}
    in_top = planted_found(synth, {c: [g["phrases"] for g in groups] for c, groups in top_k.items()})
    return {
        "planted_in_top_k": sum(v["object"] + v["background"] for v in in_top.values()),
        "planted_found": sum(v["object"] + v["background"] for v in planted.values()),
        "planted_total": 2 * len(in_top),
        "claimed": {c: [g["phrases"][0] for g in groups if g.get("confident")] for c, groups in top_k.items()},
        "top_rates": {c: [[g["phrases"][0], g["count"], g.get("tried"), g.get("flip_rate")] for g in groups]
                      for c, groups in top_k.items()},
        "no_spurious_found": report.get("no_spurious_found"),
        "before": {k: report["before"][k] for k in ("avg_acc", "worst_group_acc")},
        "after": {k: report["after"][k] for k in ("avg_acc", "worst_group_acc")},
        "after_val": {k: report["after_val"][k] for k in ("avg_acc", "worst_group_acc")} if report.get("after_val") else None,
        "worse_groups": report.get("worse_groups"),
        "edits_kept": report["counts"]["edits_kept"],
        "generated": report["counts"]["generated"],
        "minutes": round(seconds / 60, 2),
        "cues": report.get("cues"),
    }


def run_suite(draws: list[Path], seeds: list[int], root: Path, arms: dict[str, list[str]] = ARMS,
              results_name: str = "suite.json", ceiling: bool = False, sets: tuple[str, ...] = (),
              run: bool = True) -> dict:
    """Every (draw, seed, arm) not yet in ``root/results_name``, each saved there as soon as it is done (with
    ``run`` False, none: only the cue probe of saved runs that lack it)."""
    from flows.aspire import aspire_flow

    results_file = root / results_name
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for draw in draws:
        config_path = draw_config(draw, root)
        for seed in seeds:
            for arm, overrides in arms.items():
                key = f"{draw.stem}/{arm}/{seed}"
                run_overrides = [*sets, *overrides, f"generate.seed={seed}", f"retrain.seed={seed}"]
                if key not in results and not run:
                    continue
                if key not in results:
                    start = time.perf_counter()
                    report = aspire_flow(config_path=str(config_path), overrides=run_overrides)
                    synth = load_config(config_path).synth
                    results[key] = summarise(report, time.perf_counter() - start, synth)
                    results_file.write_text(json.dumps(results, indent=1))
                    print(key, json.dumps(results[key]["after"]), results[key]["generated"], flush=True)
                worse = results[key].get("worse_groups") or {}
                unexplained = any(isinstance(w, dict) and "shortcut" not in w for w in worse.values())
                if not results[key].get("cues") or unexplained:  # runs saved before these existed (committed models)
                    found = committed(config_path, run_overrides, results[key]["after"])
                    cues, probed = probe(found)
                    results[key]["cues"] = results[key].get("cues") or cues
                    results[key]["worse_groups"] = explain_worse(found, worse, probed) if unexplained else worse
                    results_file.write_text(json.dumps(results, indent=1))
        key = f"{draw.stem}/ceiling"
        if ceiling and run and key not in results:
            start = time.perf_counter()
            report = aspire_flow(config_path=str(balanced_config(config_path)), overrides=list(sets), until="holdout")
            results[key] = {**{k: report["before"][k] for k in ("avg_acc", "worst_group_acc", "per_group")},
                            "minutes": round((time.perf_counter() - start) / 60, 2)}
            results_file.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(results[key]), flush=True)
    return results


def committed(config_path: Path, overrides: list[str], tested: dict) -> dict[str, Any]:
    """The run's draw (``synth``), its committed ``classifier`` store and ``before`` (the ERM model's file), and,
    when its retrain stage is committed with test accuracies ``tested`` (not a result saved under other settings),
    its ``retrain`` store and ``after`` (the file of the model of the multiple it chose)."""
    from flows.keys import chain
    from tasks import classifier, ingest, retrain

    config = load_config(config_path, overrides)
    found: dict[str, Any] = {"synth": config.synth}
    for name, store in chain(config, ingest.list_dataset(config)):
        marker = store.stage_marker()
        if marker is None:
            break
        if name == "classifier":
            found |= {"classifier": store, "before": classifier.model_file(store)}
        test = marker["summary"].get("after", {}).get("test", {})
        if name == "retrain" and all(test.get(k) == v for k, v in tested.items()):
            chosen = (marker["summary"].get("per_class") or {}).get("chosen")
            found |= {"retrain": store,
                      "after": classifier.model_file(store, retrain.multiple_part(classifier.MODEL_PART, chosen))}
    return found


def probe(run: dict[str, Any], per_cell: int = 8) -> tuple[dict, dict]:
    """Which cue the run's models follow (:func:`aspire.synth.cue_reliance` on the draw's cue probe) and their
    probe rows (:func:`tasks.classifier.probe_cues`): the ERM classifier (``before``) and the retrain stage's
    tested model (``after``), as :func:`committed` found them. Empty when the retrain stage is not committed or
    trained a robust method."""
    from tasks import classifier

    if not run.get("after", Path()).is_file():
        return {}, {}
    return classifier.probe_cues(run["synth"], {k: run[k] for k in ("before", "after")}, per_cell)


def explain_worse(run: dict[str, Any], worse: dict, probed: dict) -> dict:
    """``worse`` (a saved run's worse groups) with where their lost images went and their context, the cue
    probe's images (``probed``) included (:func:`aspire.report.where_lost` from the committed predictions;
    unchanged when the run is not committed)."""
    if "retrain" not in run:
        return worse
    lost = lost_images(run["classifier"].read_rows(), run["retrain"].read_rows(), probed=probed)
    return {group: {**w, **where_lost(lost.get(group))} if isinstance(w, dict) else w  # an old [before, after]
            for group, w in worse.items()}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(statistics.mean(values))} ± {_pct(statistics.stdev(values))}"


def table(results: dict, draws: list[Path], seeds: list[int]) -> str:
    """Markdown: per draw with an ASPIRE run, planted features found, worst-group / average test accuracy of (a),
    (b) ("not run" without one) and (c), mean ± std over the seeds run (column "seeds"). A worse
    group marked * lost more of its images than chance makes (p < 0.05 on some seed; :func:`aspire.report.worse_groups`);
    one marked (context) was right before only because the ERM model gave its class to that context, one marked
    (new shortcut) or (kept shortcut) lost its images to a class the augmented model gives that context to
    (:data:`aspire.report.FROM_CONTEXT`)."""
    lines = ["| draw | seeds (b) / (c) | planted in top-3 | planted claimed | features claimed | edits kept "
             "| worst group (a) none / (b) no discovery / (c) ASPIRE | average (a) / (b) / (c) | groups > 5 pts worse (c) "
             "| ceiling: balanced data, worst / average | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for draw in draws:
        runs = {arm: [results[f"{draw.stem}/{arm}/{s}"] for s in seeds if f"{draw.stem}/{arm}/{s}" in results] for arm in ARMS}
        if not runs["aspire"]:
            continue
        c, b = runs["aspire"], runs["no-discovery"]
        first = c[0]
        claimed = sum(len(v) for v in first["claimed"].values())
        worst = " / ".join([_pct(first["before"]["worst_group_acc"]),
                            _mean_std([r["after"]["worst_group_acc"] for r in b]),
                            _mean_std([r["after"]["worst_group_acc"] for r in c])])
        avg = " / ".join([_pct(first["before"]["avg_acc"]), _mean_std([r["after"]["avg_acc"] for r in b]),
                          _mean_std([r["after"]["avg_acc"] for r in c])])
        def marked(test) -> set[str]:  # the worse groups of (c) for which ``test`` holds on some seed
            return {g for r in c for g, w in (r["worse_groups"] or {}).items() if isinstance(w, dict) and test(w)}

        beyond_chance = marked(lambda w: w.get("p") is not None and w["p"] < 0.05)
        from_context = marked(lambda w: w.get("from_context"))
        shortcut = {kind: marked(lambda w, kind=kind: w.get("shortcut") == kind) for kind in ("new", "kept")}
        worse = [g + "*" * (g in beyond_chance) + " (context)" * (g in from_context)
                 + "".join(f" ({kind} shortcut)" for kind, groups in shortcut.items() if g in groups)
                 for g in sorted({g for r in c for g in (r["worse_groups"] or {})})]
        minutes = round(sum(r["minutes"] for r in c + b), 1)
        bound = results.get(f"{draw.stem}/ceiling")
        bound = f"{_pct(bound['worst_group_acc'])} / {_pct(bound['avg_acc'])}" if bound else "not run"
        lines.append(f"| {draw.stem} | {len(b)} / {len(c)} | {first['planted_in_top_k']}/{first['planted_total']} "
                     f"| {first['planted_found']}/{first['planted_total']} | {claimed} | {first['edits_kept']} "
                     f"| {worst} | {avg} | {', '.join(worse).replace('|', '/') or 'none'} | {bound} | {minutes} |")
    return "\n".join(lines) + "\n"


def cue_table(results: dict, draws: list[Path], seeds: list[int]) -> str:
    """Markdown: per draw with an ASPIRE run, which cue the models follow on the cue probe (:func:`probe`; mean
    over seeds, in %; "-" for an arm not run):
    the core shape (higher is better), another class's planted background or object (lower is better)."""
    lines = ["| draw | seeds (b) / (c) | shape (a) / (b) / (c) | another class's background followed (a) / (b) / (c) "
             "| another class's object followed (a) / (b) / (c) |", "|---|---|---|---|---|"]
    for draw in draws:
        runs = {arm: [results[k]["cues"] for s in seeds if (k := f"{draw.stem}/{arm}/{s}") in results
                      and results[k].get("cues")] for arm in ARMS}
        if not runs["aspire"]:
            continue
        cells = []
        for cue in ("shape", "background", "object"):
            values = [[r["before"][cue] for r in runs["aspire"]], *([r["after"][cue] for r in runs[arm]] for arm in ARMS)]
            cells.append(" / ".join("-" if not v or None in v else _pct(statistics.mean(v)) for v in (values[0], values[2], values[1])))
        lines.append(f"| {draw.stem} | {len(runs['no-discovery'])} / {len(runs['aspire'])} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def worse_table(results: dict, draws: list[Path], seeds: list[int]) -> str:
    """Markdown: per arm, over every run of ``draws`` and ``seeds``, the test groups more than 5 points worse
    after augmentation, and how many of them lost more than chance makes, were right before only from their
    context, or lost their images to a shortcut the augmented model follows (new or kept;
    :func:`aspire.report.where_lost`). A group counts once per run. The last column compares each group's
    accuracy after augmentation with what the balanced-data model of ``--ceiling`` (the same classifier trained
    on the draw without any shortcut) reaches on that group: a group no more than 5 points under it lost only
    what the shortcut had given it, which no augmentation that removes the shortcut can keep."""
    lines = ["| arm | runs | groups > 5 pts worse | beyond chance (p < 0.05) | right before only from the context "
             "| lost to a new shortcut | lost to a kept shortcut | none of these three "
             "| within 5 pts of the balanced-data model on the group |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in reversed(ARMS):
        worse = [{**(w if isinstance(w, dict) else {}),  # {} : an old [before, after]
                  "ceiling": (results.get(f"{draw.stem}/ceiling") or {}).get("per_group", {}).get(g)}
                 for draw in draws for s in seeds
                 if (k := f"{draw.stem}/{arm}/{s}") in results for g, w in (results[k]["worse_groups"] or {}).items()]
        runs = sum(f"{draw.stem}/{arm}/{s}" in results for draw in draws for s in seeds)
        if not runs:
            continue
        context = sum(bool(w.get("from_context")) for w in worse)
        new, kept = (sum(w.get("shortcut") == kind for w in worse) for kind in ("new", "kept"))
        chance = sum(w.get("p") is not None and w["p"] < 0.05 for w in worse)
        # untested: saved before the test from a stage no longer committed, or no image of the context is of
        # neither class (two classes)
        untold = sum(not w.get("drawn_to") for w in worse)
        neither = sum(not w.get("from_context") and not w.get("shortcut") and bool(w.get("drawn_to")) for w in worse)
        bounded = [w for w in worse if w["ceiling"] is not None and w.get("after") is not None]
        at_ceiling = sum(w["after"] >= w["ceiling"] - 0.05 - 1e-9 for w in bounded)
        lines.append(f"| {'(b) no discovery' if arm == 'no-discovery' else '(c) ASPIRE'} | {runs} | {len(worse)}"
                     + (f" ({untold} not tested for a shortcut)" if untold else "")
                     + f" | {chance} | {context} | {new} | {kept} | {neither} | {at_ceiling} of {len(bounded)}"
                     + (f" ({len(worse) - len(bounded)} without a ceiling run)" if len(bounded) < len(worse) else "") + " |")
    return "\n".join(lines) + "\n"


def ceiling_table(results: dict, draws: list[Path]) -> str:
    """Markdown: per draw, the balanced-data ERM run of ``--ceiling``."""
    lines = ["| draw | ceiling worst group | ceiling average | minutes |", "|---|---|---|---|"]
    for draw in draws:
        bound = results.get(f"{draw.stem}/ceiling")
        if bound:
            lines.append(f"| {draw.stem} | {_pct(bound['worst_group_acc'])} | {_pct(bound['avg_acc'])} | {bound['minutes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "suite")
    parser.add_argument("--draws", default="", help="comma-separated draw names (default: every file of configs/suite)")
    parser.add_argument("--seeds", default="0", help="comma-separated generate / retrain seeds")
    parser.add_argument("--ceiling", action="store_true", help="also ERM on the draw without a shortcut (the bound)")
    parser.add_argument("--ceiling-only", action="store_true", help="only the ceiling runs, no arm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. classifier.epochs=18; use its own --root)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run (default: all)")
    parser.add_argument("--results", default="suite.json",
                        help="results file under --root (another name keeps an ablation beside the suite's caches)")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: write the tables from the saved results (probing saved runs that lack it)")
    parser.add_argument("--fresh", type=int, default=0, metavar="N",
                        help="run N draws nobody has seen (made-up names, random settings) instead of configs/suite")
    parser.add_argument("--fresh-seed", type=int, default=1, help="seed of the --fresh draws")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    draws = write_fresh_draws(args.fresh, args.fresh_seed, args.root) if args.fresh else sorted(SUITE.glob("*.yaml"))
    if args.draws:
        wanted = args.draws.split(",")
        draws = [d for d in draws if d.stem in wanted]
    seeds = [int(s) for s in args.seeds.split(",")]
    prefect_defaults()
    if not args.tables_only:
        start_prefect()  # Ctrl-C or a kill stops the suite, and never leaves its Prefect server running
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))} (arms: {', '.join(ARMS)})")
    arms = {} if args.ceiling_only else {a: o for a, o in ARMS.items() if a in args.arms.split(",")}
    results = run_suite(draws, seeds, args.root.resolve(), arms, results_name=args.results,
                        ceiling=args.ceiling or args.ceiling_only, sets=tuple(args.set), run=not args.tables_only)
    text = ceiling_table(results, draws) if args.ceiling_only else (
        table(results, draws, seeds) + "\n" + worse_table(results, draws, seeds) + "\n" + cue_table(results, draws, seeds))
    (args.root / Path(args.results).with_suffix(".md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
