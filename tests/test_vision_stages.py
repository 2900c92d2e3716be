"""The remove and background stage tasks end to end with the real model backends, tiny and random-weight,
loaded by the same loaders users run: transformers Grounding DINO + transformers SAM + LaMa (TorchScript via
LAMA_MODEL); groundingdino-py (local tiny BERT) + segment-anything; InstructPix2Pix."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_grounders import gd_config, gdino_files, save_tiny_hf_grounding_dino  # noqa: F401 (fixtures)
from test_inpainters import lama_file  # noqa: F401 (fixture)
from test_instruct_pix2pix import tiny_model  # noqa: F401 (fixture)
from test_segmenters import TINY, sam_checkpoint, save_tiny_hf_sam, tiny_registry  # noqa: F401 (fixtures)

from aspire.cache import StageStore, file_digest
from aspire.classifier import build_model, save_model
from aspire.config import BackgroundConfig, ClassifierConfig, RemoveConfig
from tasks.background import background_shard_task
from tasks.remove import remove_shard_task

pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def classifier(tmp_path):
    config = ClassifierConfig(arch="small-cnn", image_size=32, device="cpu", batch_size=4)
    path = tmp_path / "model.pt"
    save_model(build_model(config, 2), path, config, ["dog", "cat"])
    return path, file_digest(path)


def held_out(tmp_path: Path, n: int = 3, size: int = 160) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{i}", "path": str(path), "label": 0, "class_name": "dog", "split": "train",
                     "source": "original", "foreground": ["sled", "snow"], "background": "snow", "alt": "desert",
                     "extract_error": None})
    return rows


def check_attempts(marker: dict, store: StageStore, source: str, expected: int) -> list[dict]:
    rows = store.read_shard(0).rows
    attempts = [r for r in rows if r.get("source") == source]
    assert len(attempts) == expected and marker["stats"]["edits_tried"] + marker["stats"]["skipped"] == expected
    for attempt in attempts:  # every attempt is either an edit with a prediction, or skipped with a reason
        assert (attempt["skip_reason"] is None) == (attempt["pred"] is not None)
        if attempt["kept"]:
            assert Path(attempt["path"]).is_file() and Path(attempt["path"]).parent == store.part_dir("shard-00000")
    return attempts


def test_remove_with_hf_grounding_dino_hf_sam_and_lama(tmp_path, classifier, lama_file):  # noqa: F811
    config = RemoveConfig(ground="hf-grounding-dino", ground_model=str(save_tiny_hf_grounding_dino(tmp_path / "gd")),
                          box_threshold=0.0, text_threshold=0.0, segment="hf-sam",
                          hf_sam_model=str(save_tiny_hf_sam(tmp_path / "sam")), inpaint="lama", device="cpu",
                          max_mask_fraction=1.0, batch_size=2)
    store = StageStore(tmp_path / "work", "remove", "key")
    marker = remove_shard_task.fn(store, 0, held_out(tmp_path), config, *classifier)
    attempts = check_attempts(marker, store, "edit-remove", expected=6)
    assert marker["stats"]["edits_tried"] > 0 and all(a["boxes"] for a in attempts if a["skip_reason"] is None)


def test_remove_with_groundingdino_py_and_segment_anything(tmp_path, classifier, gdino_files, sam_checkpoint,  # noqa: F811
                                                           monkeypatch):
    fields = gd_config(gdino_files).model_dump()  # ground_size 160
    config = RemoveConfig.model_construct(**{**fields, "segment": "sam", "sam_model_type": TINY,
                                             "sam_checkpoint": sam_checkpoint, "inpaint": "opencv",
                                             "max_mask_fraction": 1.0, "batch_size": 2})
    store = StageStore(tmp_path / "work", "remove", "key")
    marker = remove_shard_task.fn(store, 0, held_out(tmp_path, n=2), config, *classifier)
    check_attempts(marker, store, "edit-remove", expected=4)
    assert marker["stats"]["edits_tried"] > 0


def test_background_with_instruct_pix2pix(tmp_path, classifier, tiny_model):  # noqa: F811
    config = BackgroundConfig(model=str(tiny_model), steps=2, resolution=32, device="cpu", safety_checker=False,
                              batch_size=2)
    store = StageStore(tmp_path / "work", "background", "key")
    rows = held_out(tmp_path, n=3, size=48)
    rows[2]["alt"] = ""
    marker = background_shard_task.fn(store, 0, rows, config, RemoveConfig(), *classifier)
    attempts = check_attempts(marker, store, "edit-background", expected=3)
    assert [a["skip_reason"] for a in attempts].count("no alternative") == 1
    assert marker["stats"]["edits_tried"] == 2
    assert torch.get_num_threads() == 1  # the tiny diffusion model ran under the one-thread fixture
