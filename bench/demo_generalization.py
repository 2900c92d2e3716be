"""The demo's claims on other benchmarks: another seed, and other class / object / background names.

Usage: .venv/bin/python bench/demo_generalization.py [--seed 1] [--workdir DIR]

Runs the demo config (configs/demo.yaml) on a benchmark drawn with ``--seed`` and renamed features
(cat/fish/plane with ball/net/kite on couch/ocean/sky/forest), and prints whether every planted feature was
found in its class's top-3 and the test accuracy before and after augmentation. (Class shapes must be
tellable apart at 64 px: a hexagon against a circle is not, and then no augmentation can help.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from flows.runtime import prefect_defaults

REPO = Path(__file__).resolve().parents[1]
RENAMED = {
    "classes": [
        {"name": "cat", "shape": "square", "color": [120, 110, 100], "words": ["a cat", "two cats", "a kitten", "a tabby cat"],
         "background": "couch", "object": "ball"},
        {"name": "fish", "shape": "circle", "color": [120, 110, 100], "words": ["a fish", "two fish", "a small fish", "a goldfish"],
         "background": "ocean", "object": "net"},
        {"name": "plane", "shape": "triangle", "color": [120, 110, 100], "words": ["a plane", "two planes", "a jet", "an airplane"],
         "background": "sky", "object": "kite"},
    ],
    "objects": [
        {"name": "ball", "shape": "diamond", "color": [230, 60, 60], "words": ["a ball", "a red ball", "a rubber ball"]},
        {"name": "net", "shape": "cross", "color": [240, 240, 240], "words": ["a net", "a white net", "a fishing net"]},
        {"name": "kite", "shape": "star", "color": [250, 200, 30], "words": ["a kite", "a yellow kite", "a paper kite"]},
    ],
    "backgrounds": [
        {"name": "couch", "texture": "checker", "colors": [[150, 60, 60], [120, 40, 40]],
         "words": ["on a couch", "on a sofa", "in a living room"]},
        {"name": "ocean", "texture": "waves", "colors": [[20, 70, 140], [40, 110, 180]],
         "words": ["in the ocean", "in the sea", "under the water"]},
        {"name": "sky", "texture": "noise", "colors": [[150, 200, 245], [200, 225, 250]],
         "words": ["in the sky", "in a blue sky", "in a clear sky"]},
        {"name": "forest", "texture": "vstripes", "colors": [[30, 90, 40], [60, 120, 50]],
         "words": ["in a forest", "in the woods", "among the trees"]},
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp(prefix="aspire-general-")))
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["synth"].update({**RENAMED, "seed": args.seed})
    config["extract"]["synonyms"] = {"cat": ["kitten"], "plane": ["jet", "airplane"]}
    config.update(workdir=str(args.workdir))
    config["dataset"]["root"] = str(args.workdir / "benchmark")
    config["background"]["bank"] = str(args.workdir / "benchmark" / "backgrounds")
    path = args.workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    prefect_defaults()
    from flows.aspire import aspire_flow

    start = time.perf_counter()
    report = aspire_flow(config_path=str(path))
    print(f"seed {args.seed}, renamed features, {time.perf_counter() - start:.0f} s")
    print("planted found:", json.dumps(report["planted_found"]))
    print("spurious:", json.dumps(report["spurious"]))
    for when in ("before", "after"):
        print(f"{when}: avg {report[when]['avg_acc']:.3f} worst-group {report[when]['worst_group_acc']:.3f}")


if __name__ == "__main__":
    main()
