"""Config loading: YAML + overrides, validated, with errors that name the key, the value and the expectation."""

from pathlib import Path

import pytest

from aspire.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_and_paths_become_absolute(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", base=tmp_path)
    assert config.classifier.arch == "small-cnn"
    assert config.workdir == (tmp_path / "data/runs/demo").resolve()
    assert config.dataset.root.is_absolute()


def test_overrides_set_nested_keys_with_yaml_types(tmp_path):
    path = write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\n")
    config = load_config(path, ["classifier.epochs=3", "classifier.lr=1e-2", "holdout.fraction=0.5",
                                "runner.kind=dask", "classifier.weights=null"], base=tmp_path)
    assert (config.classifier.epochs, config.classifier.lr, config.holdout.fraction) == (3, 0.01, 0.5)
    assert config.runner.kind == "dask" and config.classifier.weights is None


def test_invalid_value_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\nholdout: {fraction: 1.5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, base=tmp_path)
    message = str(err.value)
    assert "run.yaml" in message and "holdout.fraction = 1.5" in message and "less than or equal to 1" in message


def test_unknown_key_and_bad_choice_are_named(tmp_path):
    path = write(tmp_path, "workdir: out\ndataset: {format: pngs, root: imgs}\nclassifer: {epochs: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, base=tmp_path)
    message = str(err.value)
    assert "dataset.format = 'pngs'" in message and "'imagefolder'" in message
    assert "classifer" in message and "Extra inputs are not permitted" in message


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "dataset: {format: imagefolder, root: imgs}\n")
    with pytest.raises(ConfigError, match="workdir = <missing>: Field required"):
        load_config(path, base=tmp_path)


def test_bad_override_and_missing_file(tmp_path):
    path = write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\n")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["classifier.epochs"], base=tmp_path)
    with pytest.raises(ConfigError, match="'workdir' is"):
        load_config(path, ["workdir.sub=1"], base=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_duplicate_keys_and_booleans_for_numbers_are_refused(tmp_path):
    """Plain YAML keeps the last of two equal keys, and pydantic reads ``true`` as 1: both hide a typo."""
    path = write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\nclassifier:\n  epochs: 3\n"
                           "  lr: 0.1\n  epochs: 30\n")
    with pytest.raises(ConfigError, match=r"run.yaml, line 6: duplicate key 'epochs'$"):
        load_config(path, base=tmp_path)
    path = write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\nclassifier: {epochs: true}\n")
    with pytest.raises(ConfigError, match="epochs=True: expected a number, not a boolean"):
        load_config(path, base=tmp_path)
    with pytest.raises(ConfigError, match="boolean"):
        load_config(write(tmp_path, "workdir: out\ndataset: {format: imagefolder, root: imgs}\n"), ["retrain.epochs=false"],
                    base=tmp_path)
    assert load_config(path, ["classifier.epochs=2", "remove.enabled=false"], base=tmp_path).remove.enabled is False
