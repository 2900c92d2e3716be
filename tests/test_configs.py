"""Every shipped config validates (paths need not exist to validate)."""

from pathlib import Path

import pytest

from aspire.config import ComposeRunConfig, ConfigError, load_config

FOLDER = Path(__file__).resolve().parents[1] / "configs"
COMPOSE = ("hard_spurious_imagenet.yaml",)
CONFIGS = sorted(p for p in FOLDER.glob("*.yaml") if p.name != "synth.yaml" and p.name not in COMPOSE)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path, tmp_path):
    config = load_config(path, base=tmp_path)
    assert config.workdir.is_absolute() and config.dataset.root.is_absolute()


@pytest.mark.parametrize("name", COMPOSE)
def test_compose_config_validates_and_bad_values_are_named(name, tmp_path):
    config = load_config(FOLDER / name, base=tmp_path, model=ComposeRunConfig)
    assert config.source.root.is_absolute() and config.output.is_absolute()
    assert config.compose.sizes == [56, 84, 112] and config.remove.dilate == 15
    with pytest.raises(ConfigError, match=r"compose = .*sizes \[300\]: must be between 1 and canvas \(224\)"):
        load_config(FOLDER / name, ["compose.sizes=[56, 300]"], base=tmp_path, model=ComposeRunConfig)
    with pytest.raises(ConfigError, match="compose.aspect"):
        load_config(FOLDER / name, ["compose.aspect=stretch"], base=tmp_path, model=ComposeRunConfig)


def test_real_data_configs_carry_the_papers_trainer_settings():
    """ASPIRE: 100 ERM epochs; JTT App. A: (T, lambda_up, lr, l2) per dataset; Group DRO's lr and l2."""
    from aspire.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("waterbirds", "celeba", "spuco_dogs", "hard_imagenet"):
        assert load_config(root / f"{name}.yaml").classifier.epochs == 100, name
    waterbirds, celeba = load_config(root / "waterbirds.yaml").retrain, load_config(root / "celeba.yaml").retrain
    assert waterbirds.trainer_args("jtt") == {"identification_epochs": 60, "upweight": 100, "lr": 1e-5, "l2": 1.0}
    assert celeba.trainer_args("jtt") == {"identification_epochs": 1, "upweight": 50, "lr": 1e-5, "l2": 0.1}
    assert (waterbirds.groupdro_lr, waterbirds.groupdro_l2, celeba.groupdro_l2) == (1e-5, 1.0, 0.1)


def test_corner_cases_training_config_carries_the_papers_recipe():
    """Corner Cases Sec. 5.6: batch 256, constant lr 0.001, 20 epochs, momentum 0.9, weight decay 0.001, crops of
    aspect (0.75, 1.33) and flips; DFR l2 with lambda = 100; JTT with the ERM model's settings and lambda_up 50."""
    config = load_config(FOLDER / "hard_spurious_imagenet_train.yaml")
    c = config.classifier
    assert (c.arch, c.batch_size, c.lr, c.epochs, c.momentum, c.weight_decay) == ("resnet50", 256, 1e-3, 20, 0.9, 1e-3)
    assert (c.augment, c.crop_ratio, c.image_size) == ("crop-flip", (0.75, 1.33), 224)
    assert config.retrain.trainer_args("dfr", erm_model="model.pt") == {"penalty": "l2", "c_grid": (0.01,),
                                                                       "base_model_path": "model.pt"}
    assert config.retrain.trainer_args("jtt")["upweight"] == 50
    assert config.dataset.format == "hf-imagefolder" and config.dataset.root.name == "hard_spurious_imagenet"
