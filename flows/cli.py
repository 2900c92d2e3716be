"""The ``aspire`` command line (Typer). Heavy imports happen inside the commands so ``--help`` is quick."""

from __future__ import annotations

import difflib
import json
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import typer

from flows.runtime import prefect_defaults

app = typer.Typer(help="ASPIRE: find the spurious features a classifier leans on, and augment them away.",
                  no_args_is_help=True)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
STAGE_NAMES = ("ingest", "classifier", "holdout", "caption", "extract", "remove", "background", "collapse",
               "personalize", "generate", "export", "retrain")  # flows.keys.STAGES (a test keeps them equal)
METHOD_NAMES = ("erm", "jtt", "dfr", "groupdro", "clarify", "slim")  # flows.train.METHODS (likewise)
SetOption = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                         help="Override a config key, e.g. --set classifier.epochs=5 (repeatable).")
ConfigArgument = typer.Argument(..., metavar="CONFIG", help="YAML run config.", show_default=False)
DEBUG = {"on": False}  # --debug: show tracebacks of user errors too


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"aspire {version('aspire-pipeline')}")
        except PackageNotFoundError:
            typer.echo("aspire (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show the traceback of errors caused by the input too."),
         _: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """ASPIRE: find the spurious features a classifier leans on, and augment them away."""
    DEBUG["on"] = debug


INTERRUPTED = "interrupted: what was committed so far is kept; the same command resumes from it"


def fail(message: str, exc: BaseException | None = None, status: int = 2) -> None:
    """A user's mistake (exit status 2), a stage that stopped the run (1) or Ctrl-C (130): the message in red on
    stderr, no traceback (unless --debug)."""
    if DEBUG["on"] and exc is not None:
        raise exc
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(status)


def choose(kind: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; else fail naming the nearest one."""
    if value in choices:
        return value
    near = difflib.get_close_matches(value, choices, n=1)
    fail(f"unknown {kind} {value!r}" + (f"; did you mean {near[0]!r}?" if near else "") + f" ({kind}s: {', '.join(choices)})")
    return value


def _load(config: Path, overrides: list[str] | None, model=None):
    from aspire.config import ConfigError, load_config

    try:
        return load_config(config, overrides, model=model)
    except ConfigError as exc:
        fail(str(exc), exc)


def _preflight(run_config, until: str = STAGE_NAMES[-1], methods: tuple[str, ...] = ()) -> list | None:
    """The dataset's listing once every check passed; else every problem, one line each, and exit 2."""
    from flows.preflight import PreflightError, preflight

    try:
        return preflight(run_config, until, methods)
    except PreflightError as exc:
        fail("\n".join(exc.problems) + f"\n({len(exc.problems)} problem(s) found before the run; nothing was run)", exc)


def _run_flow(config: Path, overrides: list[str], until: str | None = None, force: list[str] | None = None) -> dict:
    prefect_defaults()
    until = until or STAGE_NAMES[-1]
    run_config = _load(config, overrides)
    listing = _preflight(run_config, until)  # fail early, before Prefect starts
    from flows.aspire import committed_report

    report = None if force else committed_report(run_config, until, listing)
    if report is not None:  # a warm rerun: decided from the markers, no Prefect server, no flow run
        typer.echo(f"every stage up to {until} is committed for this config: nothing to run (the report is rebuilt "
                   "from the stage markers; --force or `aspire stage NAME --force` recomputes)", err=True)
        return report
    from prefect import tags

    from flows.aspire import aspire_flow
    from flows.running import StageFailed, storage_error, storage_problem
    from flows.runtime import start_prefect, terminal_display

    start_prefect()  # an interrupted run is recorded and exits at once; a killed one leaves no server

    stages = STAGE_NAMES[: STAGE_NAMES.index(until) + 1]
    with terminal_display(), tags("aspire", f"dataset:{run_config.dataset.format}", f"stages:{stages[0]}..{until}"):
        try:
            return aspire_flow(config_path=str(config.resolve()), overrides=overrides, until=until, force=force or [])
        except KeyboardInterrupt as exc:
            fail(INTERRUPTED, exc, status=130)
        except StageFailed as exc:
            fail(str(exc), exc, status=1)
        except Exception as exc:
            storage = storage_error(exc)
            if storage is None:
                raise
            fail(storage_problem(storage, run_config.workdir), exc, status=1)


def _print_summary(report: dict, workdir: Path) -> None:
    from aspire.report import per_class_text, worse_text

    for when in ("before", "after"):
        block = report.get(when)
        if block:
            typer.echo(f"{when} augmentation (test): average accuracy {block['avg_acc']:.3f}, "
                       f"worst-group accuracy {block['worst_group_acc']:.3f} (group {block['worst_group']})")
    if report.get("per_class"):
        typer.echo(per_class_text(report["per_class"]))
    typer.echo(f"counts: {json.dumps({k: v for k, v in report['counts'].items() if v is not None})}")
    planted = report.get("planted_found") or {}
    for name, groups in (report.get("spurious") or {}).items():
        found = planted.get(name)
        note = f"  (planted object found: {found['object']}, background found: {found['background']})" if found else ""
        typer.echo(f"spurious for {name}: " + " | ".join("{" + ", ".join(g) + "}" for g in groups) + note)
    for name in report.get("no_spurious_found") or []:
        typer.echo(f"no spurious feature found for {name} ({report.get('spurious_rule')})")
    cues = report.get("cues") or {}
    if "after" in cues:
        b, a = cues["before"], cues["after"]
        typer.echo(f"cue probe (synthetic benchmark), before -> after: follows the shape {b['shape']:.2f} -> "
                   f"{a['shape']:.2f}, another class's background {b['background']:.2f} -> {a['background']:.2f}, "
                   f"another class's object {b['object']:.2f} -> {a['object']:.2f}")
    worse = report.get("worse_groups") or {}
    if worse:
        typer.echo(f"groups more than 5 points worse after augmentation: {worse_text(worse)}")
    if report["quarantine"]:
        stages = Counter(q.get("stage", "?") for q in report["quarantine"])
        typer.echo(f"quarantined {len(report['quarantine'])} images ("
                   + ", ".join(f"{stage}: {n}" for stage, n in stages.items()) + f"), see {workdir / 'quarantine.csv'}")
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
        fail(f"--config {str(config)!r} does not exist")
    data = yaml.safe_load(config.read_text()) if config else {}
    try:
        synth_config = SynthConfig.model_validate(data or {})
    except ValidationError as exc:
        fail(format_validation_error(exc, str(config or "built-in synth config")), exc)
    rows = draw_benchmark(synth_config, out, seed=seed)
    typer.echo(f"wrote {len(rows)} images to {out} (spec: {out / 'spec.json'})")


@app.command()
def run(config: Path = ConfigArgument, set_: Optional[list[str]] = SetOption) -> None:
    """Run the whole ASPIRE flow (cached stages are skipped)."""
    report = _run_flow(config, set_ or [])
    _print_summary(report, _load(config, set_ or []).workdir)


@app.command()
def stage(name: str = typer.Argument(..., metavar="STAGE", help=f"One of: {', '.join(STAGE_NAMES)}.",
                                     autocompletion=lambda: list(STAGE_NAMES), show_default=False),
          config: Path = ConfigArgument,
          force: bool = typer.Option(False, "--force", help="Discard this stage's committed output first."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Run one stage on its cached upstream stages (upstream runs first if it is not committed yet)."""
    choose("stage", name, STAGE_NAMES)
    report = _run_flow(config, set_ or [], until=name, force=[name] if force else [])
    _print_summary(report, _load(config, set_ or []).workdir)


@app.command()
def status(config: Path = ConfigArgument, set_: Optional[list[str]] = SetOption) -> None:
    """Per stage: done / partial / stale / missing, rows and key (nothing is run)."""
    from flows.status import stage_status

    for line in stage_status(_load(config, set_ or [])):
        typer.echo(f"{line['stage']:<11} {line['status']:<22} rows={line['rows']!s:<8} key={line['key']}")


@app.command()
def train(config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config (after `aspire run`)."),
          method: Optional[list[str]] = typer.Option(None, "--method", metavar="METHOD",
                                                     help=f"One of {', '.join(METHOD_NAMES)} (repeatable).",
                                                     autocompletion=lambda: list(METHOD_NAMES)),
          seeds: str = typer.Option("0", metavar="SEEDS", help="Comma-separated seeds, e.g. 0,1,2."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Robust trainers on the original and the augmented training set; worst-group test accuracy per method."""
    prefect_defaults()
    methods = [choose("method", m, METHOD_NAMES) for m in method or ["erm"]]
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError as exc:
        fail(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2", exc)
    run_config = _load(config, set_ or [])
    _preflight(run_config, "classifier", tuple(methods))
    from flows.runtime import start_prefect
    from flows.train import train_flow

    start_prefect()
    try:
        train_flow(config_path=str(config.resolve()), overrides=set_ or [], methods=methods, seeds=seed_list)
    except KeyboardInterrupt as exc:
        fail(INTERRUPTED, exc, status=130)
    except ValueError as exc:  # e.g. SLIM answers or CLARIFY annotations missing: one line, the file named
        fail(str(exc).splitlines()[0], exc)
    typer.echo((run_config.workdir / "robust.md").read_text())
    typer.echo(f"table: {run_config.workdir / 'robust.md'} (also in {run_config.workdir / 'report.md'})")


@app.command()
def clarify(config: Path = typer.Argument(..., help="YAML run config (after `aspire run`)."),
            annotator: str = typer.Option("person", help="person (you type), simulated (best extracted phrase per "
                                          "class) or random (a random extracted phrase: the control)."),
            set_: Optional[list[str]] = SetOption) -> None:
    """CLARIFY's interface: describe the reference model's validation errors per class in a few words."""
    run_config = _load(config, set_ or [])
    choose("annotator", annotator, ("person", "simulated", "random"))
    _preflight(run_config, "classifier", ("clarify",))
    from flows.annotate import clarify_session

    try:
        clarify_session(run_config, annotator, ask=_ask, say=typer.echo)
    except ValueError as exc:
        fail(str(exc), exc)


@app.command()
def slim(config: Path = typer.Argument(..., help="YAML run config (after `aspire run`)."),
         annotator: str = typer.Option("person", help="person (you answer the CSV) or simulated (answers from the "
                                       "object boxes, for benchmarks)."),
         set_: Optional[list[str]] = SetOption) -> None:
    """SLIM's interface: images with the reference model's heat map to answer yes / no (is it on the object?)."""
    run_config = _load(config, set_ or [])
    choose("annotator", annotator, ("person", "simulated"))
    from flows.annotate import slim_session

    try:
        slim_session(run_config, annotator, say=typer.echo)
    except ValueError as exc:
        fail(str(exc), exc)


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
    from flows.runtime import start_prefect

    start_prefect()
    try:
        summary = compose_flow(config_path=str(config.resolve()), overrides=set_ or [])
    except KeyboardInterrupt as exc:
        fail(INTERRUPTED, exc, status=130)
    except (PlanError, SourceError, FileExistsError) as exc:
        fail(str(exc), exc)
    for key, value in summary["by_split_category"].items():
        typer.echo(f"{key:<14} {value}")
    if summary["quarantine"]:
        typer.echo(f"quarantined {len(summary['quarantine'])} source images (see compose.json)")
    typer.echo(f"{summary['images']} images in {summary['output']}")


@app.command()
def serve(config: Path = ConfigArgument,
          cron: str = typer.Option(..., help="Cron schedule, e.g. '0 3 * * *'."),
          name: str = typer.Option("aspire-scheduled", help="Deployment name."),
          set_: Optional[list[str]] = SetOption) -> None:
    """Serve the flow as a scheduled Prefect deployment (runs until interrupted)."""
    prefect_defaults()
    _preflight(_load(config, set_ or []))  # fail early on a bad config
    from flows.aspire import aspire_flow

    aspire_flow.serve(name=name, cron=cron, parameters={"config_path": str(config.resolve()), "overrides": set_ or []})


if __name__ == "__main__":
    app()
