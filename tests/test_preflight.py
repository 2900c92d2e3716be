"""User errors fail before Prefect starts and before any training, one line each, no traceback (`aspire status`
without Prefect or model files: tests/test_flow.py)."""

import os
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import METHOD_NAMES, STAGE_NAMES, app


@pytest.fixture
def config(tmp_path) -> dict:
    """A weight-free run on a six-image image folder (nothing in it needs a model)."""
    for split in ("train", "val", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    (tmp_path / "bank" / "grass").mkdir(parents=True)
    Image.new("RGB", (8, 8), "green").save(tmp_path / "bank" / "grass" / "0.png")
    return {"workdir": str(tmp_path / "run"), "dataset": {"format": "imagefolder", "root": str(tmp_path / "data")},
            "classifier": {"arch": "small-cnn", "image_size": 16, "epochs": 1, "device": "cpu"},
            "caption": {"backend": "metadata"}, "extract": {"backend": "rules"},
            "remove": {"ground": "annotations", "segment": "grabcut", "inpaint": "opencv"},
            "background": {"backend": "composite", "bank": str(tmp_path / "bank")},
            "personalize": {"backend": "none"}, "generate": {"backend": "composite"}}


def invoke(tmp_path: Path, config: dict, *args: str, env: dict | None = None):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [a.replace("CONFIG", str(path)) for a in args]
    return CliRunner().invoke(app, command, env=env)


def problems_of(result) -> list[str]:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return [line for line in result.output.splitlines() if line and not line.startswith("(")]


def test_a_clean_config_passes(tmp_path, config):
    from aspire.config import RunConfig
    from flows.preflight import preflight

    preflight(RunConfig.model_validate(config))


def hf_dataset(c: dict, t: Path, extra_test_file: str) -> None:
    """The fixture's images as an hf-imagefolder dataset whose test metadata lists one more file."""
    root = t / "hf"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        lines = ["file_name,class_name"] + [f"{name}.png,{name}" for name in ("cat", "dog")]
        for name in ("cat", "dog"):
            (root / split / f"{name}.png").write_bytes((t / "data" / split / name / "a.png").read_bytes())
        if split == "test":
            lines.append(f"{extra_test_file},cat")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    c["dataset"] = {"format": "hf-imagefolder", "root": str(root)}


def dog_only_in_test(c: dict) -> None:
    root = Path(c["dataset"]["root"])
    for split in ("train", "val"):
        for image in (root / split / "dog").iterdir():
            image.unlink()
        (root / split / "dog").rmdir()


@pytest.mark.parametrize("change, key, words", [
    (lambda c, t: c["dataset"].update(root=str(t / "nowhere")), "dataset", "does not exist"),
    (lambda c, t: c["background"].update(bank=str(t / "no-bank")), "background.bank", "no such folder"),
    (lambda c, t: c["remove"].update(ground="groundingdino", groundingdino_config=str(t / "GroundingDINO_SwinT_OGC.py"),
                                     groundingdino_checkpoint=str(t / "g.pth"), text_encoder=str(t / "bert")),
     "remove.groundingdino_config", "no such file"),
    (lambda c, t: c["remove"].update(segment="sam"), "remove.sam_checkpoint", "give the file"),
    (lambda c, t: c["remove"].update(inpaint="lama"), "LAMA_MODEL", "not set"),
    (lambda c, t: c["caption"].update(backend="git", model="nobody/no-such-captioner"), "caption.model",
     "not in the Hugging Face cache"),
    (lambda c, t: c["caption"].update(backend="git", model=str(t / "models" / "git")), "caption.model", "no such folder"),
    (lambda c, t: c["caption"].update(backend="git", model=str(t)), "caption.model", "not a saved model folder"),
    (lambda c, t: c["caption"].update(backend="blip", model=str(t / "m"), dtype="float16"), "caption.dtype",
     "half precision needs a GPU"),
    (lambda c, t: c["classifier"].update(device="cuda"), "classifier.device", "no CUDA device"),
    (lambda c, t: c["classifier"].update(weights=str(t / "resnet.pth")), "classifier.weights", "no such file"),
    (lambda c, t: c["classifier"].update(arch="resnet5O"), "classifier.arch", "torchvision.models name"),
    (lambda c, t: c["extract"].update(backend="openai", api_key_env="ASPIRE_TEST_NO_SUCH_KEY"), "extract.api_key_env",
     "not set"),
    (lambda c, t: c["extract"].update(alternatives="no-such-table.tsv"), "extract.alternatives", "no such file"),
    (lambda c, t: c.update(collapse={"embedder": "glove", "glove_path": str(t / "glove.txt")}), "collapse.glove_path",
     "set collapse.embedder=minilm"),
    (lambda c, t: c["background"].update(backend="instruct-pix2pix", model="nobody/no-such-editor"),
     "background.model", "not in the Hugging Face cache"),
    (lambda c, t: ((t / "a-file").write_text("x"), c.update(workdir=str(t / "a-file"))), "workdir", "is a file"),
    (lambda c, t: hf_dataset(c, t, "../../data/test/cat/a.png"), "dataset", "is outside the dataset root"),
    (lambda c, t: hf_dataset(c, t, "../train/cat.png"), "dataset", "are the same file"),
    (lambda c, t: dog_only_in_test(c), "dataset", "have no training images"),
])
def test_each_user_error_fails_in_one_line_before_anything_runs(tmp_path, config, monkeypatch, change, key, words):
    monkeypatch.delenv("LAMA_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    change(config, tmp_path)
    result = invoke(tmp_path, config, "run", "CONFIG")
    problems = problems_of(result)
    assert any(key in line and words in line for line in problems), problems
    assert not (tmp_path / "run").exists()  # nothing was run: no stage folder, no training


def test_every_problem_is_listed_at_once(tmp_path, config, monkeypatch):
    monkeypatch.delenv("LAMA_MODEL", raising=False)
    config["remove"].update(inpaint="lama", segment="sam")
    config["background"].update(bank=str(tmp_path / "no-bank"))
    problems = problems_of(invoke(tmp_path, config, "run", "CONFIG"))
    assert len(problems) == 3 and all(len(p) < 400 for p in problems)


def test_only_the_stages_that_run_are_checked(tmp_path, config, monkeypatch):
    from aspire.config import RunConfig
    from flows.preflight import PreflightError, preflight

    monkeypatch.delenv("LAMA_MODEL", raising=False)
    config["remove"]["inpaint"] = "lama"
    run = RunConfig.model_validate(config)
    preflight(run, until="extract")  # `aspire stage extract` needs no LaMa
    with pytest.raises(PreflightError, match="LAMA_MODEL"):
        preflight(run, until="remove")


def test_hub_ids_in_the_cache_pass_and_switch_the_run_offline(tmp_path, config, monkeypatch):
    from aspire.config import RunConfig
    from flows import preflight as module

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(module, "hub_cached", lambda repo: repo == "someone/cached-captioner")
    monkeypatch.setattr(module, "hub_reachable", lambda: False)
    config["caption"].update(backend="git", model="someone/cached-captioner")
    module.preflight(RunConfig.model_validate(config))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unknown_stage_and_method_name_the_nearest_choice(tmp_path, config):
    result = invoke(tmp_path, config, "stage", "holdot", "CONFIG")
    assert result.exit_code == 2 and "did you mean 'holdout'?" in result.output
    result = invoke(tmp_path, config, "train", "CONFIG", "--method", "grupdro")
    assert result.exit_code == 2 and "did you mean 'groupdro'?" in result.output
    result = invoke(tmp_path, config, "train", "CONFIG", "--seeds", "0,one")
    assert result.exit_code == 2 and "--seeds '0,one'" in result.output


def test_debug_shows_the_traceback_and_version_prints(tmp_path, config):
    config["dataset"]["root"] = str(tmp_path / "nowhere")
    result = invoke(tmp_path, config, "--debug", "run", "CONFIG")
    assert result.exit_code != 0 and type(result.exception).__name__ == "PreflightError"
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("aspire ")


def test_cli_choices_are_the_flow_stages_and_trainer_methods():
    from flows.keys import STAGES
    from flows.train import METHODS

    assert STAGE_NAMES == STAGES and METHOD_NAMES == tuple(METHODS)
