"""bench/gpu_stages.py at tiny sizes on the CPU, so the GPU benchmark cannot rot: every real backend is built from its
config, saved, loaded by the stage's own class, and run through both the project path and the bare model call."""

from __future__ import annotations

import pytest

from bench.gpu_stages import STAGES, Setting, run

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")]


def test_every_stage_runs_through_the_project_and_the_bare_model(tmp_path):
    results = run(list(STAGES), Setting(size="tiny", device="cpu", images=2, batch=2, steps=2), tmp_path)
    assert [r["stage"] for r in results] == list(STAGES)
    for result in results:
        assert "error" not in result, result
        pure = next(v for k, v in result.items() if k.startswith("pure"))
        assert result["project"] > 0 and pure > 0 and result["project_share"] > 0, result
    assert (tmp_path / "gpu_stages.json").is_file()
