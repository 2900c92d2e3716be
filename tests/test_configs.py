"""Every shipped config validates (paths need not exist to validate)."""

from pathlib import Path

import pytest

from aspire.config import load_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.name != "synth.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path, tmp_path):
    config = load_config(path, base=tmp_path)
    assert config.workdir.is_absolute() and config.dataset.root.is_absolute()
