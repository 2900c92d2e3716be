"""Preflight: everything a run will need, checked before Prefect starts and before any training.

A mistake in a config (a missing folder, a model that is neither a local folder nor in the Hugging Face cache
while the Hub cannot be reached, an unset API key or ``LAMA_MODEL``, float16 on a CPU) would otherwise surface
minutes into a run, after training, as a long traceback. :func:`preflight` collects every such problem as one
line naming the config key, its value and the fix; ``aspire run``/``stage``/``demo``/``serve``/``train`` print
them and stop, and the flow itself checks again first (a scheduled run has no CLI in front of it).

Only what the run will use is checked: the backends the config names, for the stages up to ``until``. Nothing is
downloaded and no model is loaded; the Hub is probed once (a 3 s TCP connect). When it cannot be reached and
every model was found locally, ``HF_HUB_OFFLINE=1`` is set for the run, so loaders do not spend minutes retrying.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from aspire.config import RunConfig
from flows.keys import STAGES

logger = logging.getLogger(__name__)

HUB_FILES = ("config.json", "model_index.json")  # a transformers model / a diffusers pipeline
HALF = ("float16", "bfloat16")


class PreflightError(ValueError):
    """One or more problems found before the run; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def preflight(config: RunConfig, until: str = STAGES[-1], methods: tuple[str, ...] = ()) -> list | None:
    """Raise :class:`PreflightError` listing every problem the stages up to ``until`` (and the trainers in
    ``methods``, for ``aspire train``) would meet; when there is none, return the dataset's listing
    (:func:`tasks.ingest.list_dataset`, None for a synthetic benchmark not drawn yet) so callers need not list
    it again."""
    stages = STAGES[: STAGES.index(until) + 1]
    checks = Checks()
    if config.workdir.exists() and not config.workdir.is_dir():
        checks.add("workdir", config.workdir, "is a file; name a folder (it is created when missing)")
    if config.synth is None:
        checks.dataset(config)
    checks.device("classifier.device", config.classifier.device)
    checks.classifier(config)
    if "caption" in stages and config.caption.backend in ("git", "blip"):
        checks.model("caption.model", config.caption.model)
        checks.device("caption.device", config.caption.device, config.caption.dtype)
    if "extract" in stages:
        checks.extract(config)
    if "remove" in stages or ("generate" in stages and config.generate.backend == "composite"):
        checks.remove(config)
    if "background" in stages or ("generate" in stages and config.generate.backend == "composite"):
        checks.background(config)
    if "collapse" in stages and config.collapse.embedder == "glove":
        if config.collapse.glove_path is None or not Path(config.collapse.glove_path).expanduser().is_file():
            checks.add("collapse.glove_path", config.collapse.glove_path, "the paper's GloVe collapse needs a GloVe "
                       "vectors text file (e.g. glove.6B.300d.txt); without one set collapse.embedder=minilm, the "
                       "default calibrated on ASPIRE's Table 4 groups (BENCHMARKS.md)")
    if "personalize" in stages and config.personalize.backend == "textual-inversion":
        checks.model("personalize.model", config.personalize.model)
        checks.initializers(config)
    if "generate" in stages and config.generate.backend == "textual-inversion":
        checks.model("personalize.model", config.personalize.model)
        checks.prompt("generate.prompt", config.generate.prompt)
        checks.device("generate.device", config.generate.device)
        if config.generate.clip_filter:
            checks.model("generate.clip_model", config.generate.clip_model)
    if ("retrain" in stages and config.retrain.method == "clarify") or "clarify" in methods:
        if config.retrain.clarify_similarity == "clip":
            if config.retrain.clarify_clip_model:
                checks.model("retrain.clarify_clip_model", config.retrain.clarify_clip_model)
            else:
                checks.add("retrain.clarify_clip_model", None, "retrain.clarify_similarity=clip needs a CLIP hub id "
                           "or local folder")
    if checks.problems:
        raise PreflightError(checks.problems)
    if checks.hub_models and not hub_reachable() and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
        logger.info("the Hugging Face Hub cannot be reached and every model is cached: HF_HUB_OFFLINE=1 for this run")
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return checks.listing


class Checks:
    """The checks, each appending one-line problems (``key=value: what is wrong; the fix``)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.hub_models: list[str] = []  # hub ids found in the local cache
        self.class_names: list[str] = []  # from the dataset listing
        self.listing: list | None = None

    def add(self, key: str, value: object, problem: str) -> None:
        line = f"{key}={'unset' if value is None else repr(str(value))}: {problem}"
        if line not in self.problems:  # one model may be needed by two stages
            self.problems.append(line)

    def dataset(self, config: RunConfig) -> None:
        from aspire.manifest import ManifestError
        from aspire.readers import DatasetError
        from tasks.ingest import list_dataset

        try:
            rows = list_dataset(config)
        except (DatasetError, ManifestError) as exc:
            self.problems.append(f"dataset ({config.dataset.format} at {config.dataset.root}): {exc}")
            return
        self.listing = rows
        self.class_names = sorted({r["class_name"] for r in rows})
        if not any(r["split"] == "train" for r in rows):
            self.add("dataset.root", config.dataset.root, "no training images found")

    def initializers(self, config: RunConfig) -> None:
        """Each class's initial word for textual inversion is one token of the model's tokenizer, and no two
        classes share one (needs the tokenizer: skipped when the model itself was not found)."""
        if not self.class_names or any(p.startswith("personalize.model=") for p in self.problems):
            return
        from tasks.personalize import check_initializers

        try:
            self.problems += check_initializers(self.class_names, config.personalize)
        except (OSError, ValueError) as exc:  # the tokenizer could not be read: the model check said why, or will
            self.add("personalize.model", config.personalize.model, f"its tokenizer does not load: {exc}")

    def device(self, key: str, device: str, dtype: str = "float32") -> None:
        wants_cuda = device.startswith("cuda")
        if not wants_cuda and dtype not in HALF:
            return
        import torch

        if wants_cuda and not torch.cuda.is_available():
            self.add(key, device, "no CUDA device is available here; use 'auto' or 'cpu'")
        elif dtype in HALF and (device == "cpu" or not torch.cuda.is_available()):
            section = key.split(".")[0]
            self.add(f"{section}.dtype", dtype, f"half precision needs a GPU and {key} would be the CPU here; "
                     "use float32")

    def classifier(self, config: RunConfig) -> None:
        weights, arch = config.classifier.weights, config.classifier.arch
        if arch != "small-cnn":
            import torchvision

            if arch not in torchvision.models.list_models():
                self.add("classifier.arch", arch, "not 'small-cnn' nor a torchvision.models name (e.g. resnet50)")
                return
        if weights in (None, "imagenet"):
            return
        if weights == "synthetic-pretrain":
            if arch != "small-cnn":
                self.add("classifier.weights", weights, "is for classifier.arch 'small-cnn' only")
            return
        if not Path(weights).expanduser().is_file():
            self.add("classifier.weights", weights, "no such file (expected None, 'imagenet', 'synthetic-pretrain' "
                     "or a state_dict .pt/.pth)")

    def extract(self, config: RunConfig) -> None:
        extract = config.extract
        if extract.backend == "rules":
            self.prompt("extract.alternatives", extract.alternatives)
            return
        if not os.environ.get(extract.api_key_env):
            self.add("extract.api_key_env", extract.api_key_env, "this environment variable is not set; export your "
                     "API key in it (any non-empty value for a local server that needs none), or use "
                     "extract.backend=rules offline")
        if extract.base_url and urlparse(extract.base_url).scheme not in ("http", "https"):
            self.add("extract.base_url", extract.base_url, "expected an http(s) URL such as http://localhost:8000/v1")
        self.prompt("extract.prompt", extract.prompt)
        self.prompt("extract.exemplars", extract.exemplars)

    def remove(self, config: RunConfig) -> None:
        remove = config.remove
        if remove.ground == "groundingdino":
            for key in ("groundingdino_config", "groundingdino_checkpoint"):
                self.file(f"remove.{key}", getattr(remove, key))
            self.model("remove.text_encoder", remove.text_encoder)
        elif remove.ground == "hf-grounding-dino":
            self.model("remove.ground_model", remove.ground_model)
        if remove.segment == "sam":
            self.file("remove.sam_checkpoint", remove.sam_checkpoint)
        elif remove.segment == "hf-sam":
            self.model("remove.hf_sam_model", remove.hf_sam_model)
        if remove.inpaint == "lama":
            from tasks.inpainters import lama_model_path

            try:
                lama_model_path()
            except ValueError as exc:
                self.problems.append(str(exc))
        self.device("remove.device", remove.device)

    def background(self, config: RunConfig) -> None:
        background = config.background
        if background.backend == "composite" or config.generate.backend == "composite":
            bank = background.bank
            drawn_by_the_run = config.synth is not None and bank is not None and \
                Path(bank).resolve().is_relative_to(Path(config.dataset.root).resolve())
            if drawn_by_the_run:  # the flow draws the synthetic benchmark's bank with it
                pass
            elif bank is None:
                self.add("background.bank", bank, "the composite backends need a folder with one sub-folder of "
                         "images per background name (`aspire synth` draws one with the benchmark)")
            elif not Path(bank).is_dir():
                self.add("background.bank", bank, "no such folder (one sub-folder of images per background name)")
            elif not any(p.is_dir() for p in Path(bank).iterdir()):
                self.add("background.bank", bank, "has no sub-folder (one per background name, images inside)")
        if background.backend == "instruct-pix2pix":
            self.model("background.model", background.model)
            self.prompt("background.prompt", background.prompt)
            self.device("background.device", background.device, "float16" if background.dtype == "float16" else "float32")

    def file(self, key: str, value: Path | None) -> None:
        if value is None:
            self.add(key, value, "give the file's path")
        elif not Path(value).expanduser().is_file():
            self.add(key, value, "no such file")

    def prompt(self, key: str, name: str) -> None:
        from tasks.extract import PROMPTS

        if not (PROMPTS / name).is_file() and not Path(name).expanduser().is_file():
            self.add(key, name, f"no such file in {PROMPTS} nor as a path")

    def model(self, key: str, value: str) -> None:
        """A local folder, or a hub id that is cached or can be downloaded (the Hub reachable, not offline)."""
        path = Path(value).expanduser()
        if path.exists():
            if not path.is_dir() or not any((path / f).is_file() for f in HUB_FILES):
                self.add(key, value, f"is not a saved model folder (no {' or '.join(HUB_FILES)} in it)")
            return
        if value.startswith(("/", ".", "~")) or value.count("/") > 1:
            self.add(key, value, "no such folder")
            return
        if hub_cached(value):
            self.hub_models.append(value)
            return
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            self.add(key, value, "not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                     "download it on a connected machine or give a local folder")
        elif not hub_reachable():
            self.add(key, value, f"not a local folder and not in the Hugging Face cache, and {hub_host()} cannot be "
                     "reached; download it on a connected machine or give a local folder")


def hub_cached(repo_id: str) -> bool:
    """Whether a snapshot of ``repo_id`` with a config file is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in HUB_FILES)
    except ValueError:  # not a valid repo id
        return False


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """A 3 s TCP connect to the Hub (assumed reachable behind a proxy, which a plain connect cannot test)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((hub_host(), 443), timeout=3).close()
        return True
    except OSError:
        return False
