"""Cold vs warm wall time of the demo flow, Prefect start-up excluded.

Usage: .venv/bin/python bench/demo_cache.py [--workdir DIR]

A trivial flow starts Prefect's ephemeral server first, so the timings below are the ASPIRE flow alone:
cold (benchmark drawn, ERM trained, everything predicted), warm (all cached), and after deleting one
prediction shard (exactly that shard recomputed).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from flows.runtime import prefect_defaults

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp(prefix="aspire-bench-")))
    args = parser.parse_args()
    prefect_defaults()
    from prefect import flow

    from flows.aspire import aspire_flow
    from flows.cli import demo_overrides

    start = time.perf_counter()
    flow(name="warm-up")(lambda: None)()
    startup = time.perf_counter() - start
    overrides = demo_overrides(args.workdir.resolve())
    timings = {}
    for name in ("cold", "warm", "one shard deleted"):
        if name == "one shard deleted":
            shutil.rmtree(next((args.workdir / "classifier").iterdir()) / "shard-00003")
        start = time.perf_counter()
        report = aspire_flow(config_path=str(REPO / "configs" / "demo.yaml"), overrides=overrides)
        timings[name] = time.perf_counter() - start
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, date {time.strftime('%Y-%m-%d')}")
    print(f"prefect start-up (excluded): {startup:.1f} s")
    for name, seconds in timings.items():
        print(f"{name:>18}: {seconds:6.1f} s  ({100 * seconds / timings['cold']:.1f}% of cold)")
    before = report["before"]
    print(f"before: avg acc {before['avg_acc']:.3f}, worst-group acc {before['worst_group_acc']:.3f}")


if __name__ == "__main__":
    main()
