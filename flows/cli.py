"""The ``aspire`` command line (Typer). Heavy imports happen inside the commands so ``--help`` is quick."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.runtime import prefect_defaults

app = typer.Typer(help="ASPIRE: find the spurious features a classifier leans on, and augment them away.",
                  no_args_is_help=True, add_completion=False)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SetOption = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable).")


def _load(config: Path, overrides: list[str] | None, model=None):
    from aspire.config import ConfigError, load_config

    try:
        return load_config(config, overrides, model=model)
    except ConfigError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


def _run_flow(config: Path, overrides: list[str], until: str | None = None, force: list[str] | None = None) -> dict:
    prefect_defaults()
    _load(config, overrides)  # fail early, before Prefect starts, on a bad config
    from flows.aspire import STAGES, aspire_flow

    return aspire_flow(config_path=str(config.resolve()), overrides=overrides, until=until or STAGES[-1], force=force or [])


def _print_summary(report: dict, workdir: Path) -> None:
    for when in ("before", "after"):
        block = report.get(when)
        if block:
            typer.echo(f"{when} augmentation (test): average accuracy {block['avg_acc']:.3f}, "
                       f"worst-group accuracy {block['worst_group_acc']:.3f} (group {block['worst_group']})")
    typer.echo(f"counts: {json.dumps({k: v for k, v in report['counts'].items() if v is not None})}")
    planted = report.get("planted_found") or {}
    for name, groups in (report.get("spurious") or {}).items():
        found = planted.get(name)
        note = f"  (planted object found: {found['object']}, background found: {found['background']})" if found else ""
        typer.echo(f"spurious for {name}: " + " | ".join("{" + ", ".join(g) + "}" for g in groups) + note)
    for name in report.get("no_spurious_found") or []:
        typer.echo(f"no spurious feature found for {name} ({report.get('spurious_rule')})")
    worse = report.get("worse_groups") or {}
    if worse:
        typer.echo("groups more than 5 points worse after augmentation: "
                   + ", ".join(f"{g} {b:.2f} -> {a:.2f}" for g, (b, a) in worse.items()))
    if report["quarantine"]:
        typer.echo(f"quarantined {len(report['quarantine'])} images, see {workdir / 'quarantine.csv'}")
    typer.echo(f"report: {workdir / 'report.md'}")


def demo_overrides(workdir: Path) -> list[str]:
    """The demo config's paths moved under ``workdir`` (values JSON-quoted: any path survives YAML parsing)."""
    benchmark = workdir / "benchmark"
    return [f"workdir={json.dumps(str(workdir))}", f"dataset.root={json.dumps(str(benchmark))}",
            f"background.bank={json.dumps(str(benchmark / 'backgrounds'))}"]


@app.command()
def demo(workdir: Path = typer.Option(Path("data/runs/demo"), help="Where the benchmark and all outputs go.")) -> None:
    """Draw the synthetic benchmark and run the pipeline on it with weight-free backends on CPU."""
    workdir = workdir.resolve()
    report = _run_flow(DEMO_CONFIG, demo_overrides(workdir))
    _print_summary(report, workdir)


@app.command()
def synth(out: Path = typer.Argument(..., help="Output folder for the benchmark."),
          config: Optional[Path] = typer.Option(None, help="YAML with SynthConfig fields (default: built-in)."),
          seed: Optional[int] = typer.Option(None, help="Seed (overrides the config's).")) -> None:
    """Draw a synthetic benchmark with planted spurious backgrounds and objects."""
    import yaml
    from pydantic import ValidationError

    from aspire.config import format_validation_error
    from aspire.synth import SynthConfig, draw_benchmark

    if config is not None and not config.is_file():
        typer.secho(f"--config {str(config)!r} does not exist", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    data = yaml.safe_load(config.read_text()) if config else {}
    try:
        synth_config = SynthConfig.model_validate(data or {})
    except ValidationError as exc:
        typer.secho(format_validation_error(exc, str(config or "built-in synth config")), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    rows = draw_benchmark(synth_config, out, seed=seed)
    typer.echo(f"wrote {len(rows)} images to {out} (spec: {out / 'spec.json'})")


@app.command()
def run(config: Path = typer.Argument(..., help="YAML run config."), set_: Optional[list[str]] = SetOption) -> None:
    """Run the whole ASPIRE flow (cached stages are skipped)."""
    report = _run_flow(config, set_ or [])
    _print_summary(report, _load(config, set_ or []).workdir)


@app.command()
def stage(name: str = typer.Argument(..., help="Stage name, e.g. holdout."),
          config: Path = typer.Argument(..., help="YAML run config."),
          force: bool = typer.Option(False, "--force", help="Discard this stage's committed output first."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Run one stage on its cached upstream stages (upstream runs first if it is not committed yet)."""
    from flows.aspire import STAGES

    if name not in STAGES:
        typer.secho(f"unknown stage {name!r}; stages: {' '.join(STAGES)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    report = _run_flow(config, set_ or [], until=name, force=[name] if force else [])
    _print_summary(report, _load(config, set_ or []).workdir)


@app.command()
def status(config: Path = typer.Argument(..., help="YAML run config."), set_: Optional[list[str]] = SetOption) -> None:
    """Per stage: done / partial / stale / missing, rows and key (nothing is run)."""
    from flows.status import stage_status

    for line in stage_status(_load(config, set_ or [])):
        typer.echo(f"{line['stage']:<11} {line['status']:<22} rows={line['rows']!s:<8} key={line['key']}")


@app.command()
def train(config: Path = typer.Argument(..., help="YAML run config (after `aspire run`)."),
          method: Optional[list[str]] = typer.Option(None, "--method", help="erm, jtt, dfr, groupdro, clarify or slim "
                                                     "(repeatable)."),
          seeds: str = typer.Option("0", help="Comma-separated seeds, e.g. 0,1,2."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Robust trainers on the original and the augmented training set; worst-group test accuracy per method."""
    prefect_defaults()
    run_config = _load(config, set_ or [])
    from flows.train import train_flow

    try:
        train_flow(config_path=str(config.resolve()), overrides=set_ or [], methods=method or ["erm"],
                   seeds=[int(s) for s in seeds.split(",")])
    except ValueError as exc:  # e.g. SLIM answers or CLARIFY annotations missing: one line, the file named
        typer.secho(str(exc).splitlines()[0], fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    typer.echo((run_config.workdir / "robust.md").read_text())
    typer.echo(f"table: {run_config.workdir / 'robust.md'} (also in {run_config.workdir / 'report.md'})")


@app.command()
def clarify(config: Path = typer.Argument(..., help="YAML run config (after `aspire run`)."),
            annotator: str = typer.Option("person", help="person (you type), simulated (best extracted phrase per "
                                          "class) or random (a random extracted phrase: the control)."),
            set_: Optional[list[str]] = SetOption) -> None:
    """CLARIFY's interface: describe the reference model's validation errors per class in a few words."""
    run_config = _load(config, set_ or [])
    if annotator not in ("person", "simulated", "random"):
        typer.secho(f"--annotator {annotator!r}: expected person, simulated or random", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from flows.annotate import clarify_session

    try:
        clarify_session(run_config, annotator, ask=_ask, say=typer.echo)
    except ValueError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


@app.command()
def slim(config: Path = typer.Argument(..., help="YAML run config (after `aspire run`)."),
         annotator: str = typer.Option("person", help="person (you answer the CSV) or simulated (answers from the "
                                       "object boxes, for benchmarks)."),
         set_: Optional[list[str]] = SetOption) -> None:
    """SLIM's interface: images with the reference model's heat map to answer yes / no (is it on the object?)."""
    run_config = _load(config, set_ or [])
    if annotator not in ("person", "simulated"):
        typer.secho(f"--annotator {annotator!r}: expected person or simulated", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from flows.annotate import slim_session

    try:
        slim_session(run_config, annotator, say=typer.echo)
    except ValueError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:  # stdin closed (a pipe ran out): keep what was typed so far
        return ""


@app.command()
def compose(config: Path = typer.Argument(..., help="YAML compose config (see configs/hard_spurious_imagenet.yaml)."),
            set_: Optional[list[str]] = SetOption) -> None:
    """Build Hard-Spurious-ImageNet: inpainted backgrounds, objects at 56/84/112 px in the centre or a corner."""
    from aspire.config import ComposeRunConfig

    prefect_defaults()
    _load(config, set_ or [], model=ComposeRunConfig)  # fail early, before Prefect starts
    from aspire.compose import PlanError
    from aspire.imagenet import SourceError
    from flows.compose import compose_flow

    try:
        summary = compose_flow(config_path=str(config.resolve()), overrides=set_ or [])
    except (PlanError, SourceError, FileExistsError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    for key, value in summary["by_split_category"].items():
        typer.echo(f"{key:<14} {value}")
    if summary["quarantine"]:
        typer.echo(f"quarantined {len(summary['quarantine'])} source images (see compose.json)")
    typer.echo(f"{summary['images']} images in {summary['output']}")


@app.command()
def serve(config: Path = typer.Argument(..., help="YAML run config."),
          cron: str = typer.Option(..., help="Cron schedule, e.g. '0 3 * * *'."),
          name: str = typer.Option("aspire-scheduled", help="Deployment name."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Serve the flow as a scheduled Prefect deployment (runs until interrupted)."""
    prefect_defaults()
    _load(config, set_ or [])  # fail early on a bad config
    from flows.aspire import aspire_flow

    aspire_flow.serve(name=name, cron=cron, parameters={"config_path": str(config.resolve()), "overrides": set_ or []})


if __name__ == "__main__":
    app()
