"""Run configuration: YAML files validated by frozen pydantic models, with ``--set key=value`` overrides.

Each stage has one config model; :class:`RunConfig` combines them. Every field carries a description, so
``aspire <command> --help`` and error messages can say what a key means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from aspire.synth import SynthConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the value and the expectation."""


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, and ``true``/``false`` refused where a number
    is meant (pydantic would read ``epochs: true`` as 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _numeric(field.annotation):
                    raise ValueError(f"{name}={value!r}: expected a number, not a boolean")
        return data


def _numeric(annotation: Any) -> bool:
    """int, float, or an Optional/Union of them without bool."""
    options = getattr(annotation, "__args__", None) or (annotation,)
    return bool not in options and any(a in (int, float) for a in options)


DatasetFormat = Literal["imagefolder", "hf-imagefolder", "waterbirds", "celeba", "spuco"]


class DatasetConfig(Section):
    """Where the images are and how to read them into a manifest."""

    format: DatasetFormat = Field(description="Reader: imagefolder, hf-imagefolder, waterbirds, celeba, spuco.")
    root: Path = Field(description="Dataset root folder (relative paths are taken from the current directory).")
    target_attr: str = Field("Blond_Hair", description="CelebA: attribute used as the class label.")
    spurious_attr: str = Field("Male", description="CelebA: attribute that defines the spurious group.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="imagefolder without split folders: fraction of images put in val (and as much in test).",
    )
    seed: int = Field(0, description="Seed for any random split the reader has to make.")


class PretrainConfig(Section):
    """``classifier.weights: synthetic-pretrain``: the small CNN's backbone pretrained on a balanced synthetic corpus
    (:mod:`aspire.pretrain`), the CPU world's stand-in for ImageNet weights."""

    classes: int = Field(8, ge=2, le=10, description="Pretraining shapes (classes), none of them a benchmark shape.")
    images_per_class: int = Field(400, ge=2, description="Training images per shape (every shape on random backgrounds).")
    epochs: int = Field(10, ge=1, description="Pretraining epochs.")
    lr: float = Field(0.003, gt=0, description="Pretraining SGD learning rate (0.01 and above stay at chance here).")
    seed: int = Field(0, ge=0, description="Seed of the corpus and of the pretraining run (fixed, like ImageNet weights).")
    cache: str | None = Field(None, description="Folder of the committed backbone (default $ASPIRE_CACHE or ~/.cache/aspire).")


class ClassifierConfig(Section):
    """The ERM classifier of ASPIRE step 1 (https://arxiv.org/abs/2308.10103, Sec. 2(1) and 3)."""

    arch: str = Field(
        "resnet50", description="'small-cnn' (random init, CPU demo) or any torchvision.models name."
    )
    weights: str | None = Field(
        None,
        description="None (random init), 'imagenet' (torchvision default weights, needs the hub or its cache), "
        "a path to a state_dict (.pt/.pth) for the backbone, or 'synthetic-pretrain' (small-cnn only: a backbone "
        "pretrained once on a balanced synthetic corpus, see classifier.pretrain).",
    )
    pretrain: PretrainConfig = PretrainConfig()
    image_size: int = Field(224, ge=16, description="Images are resized to image_size x image_size.")
    epochs: int = Field(100, ge=1, description="Training epochs (ASPIRE trains to convergence).")
    lr: float = Field(1e-3, gt=0, description="SGD learning rate (ASPIRE: 1e-3).")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay (ASPIRE: 1e-4).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    batch_size: int = Field(64, ge=1, description="Training and prediction batch size.")
    augment: Literal["none", "crop-flip"] = Field(
        "none", description="Training-time augmentation: none, or crop-flip (a random crop of crop_scale of the "
        "area and crop_ratio aspect, resized to image_size, then a random horizontal flip: the Corner Cases "
        "recipe, Sec. 5.6). Prediction and feature extraction never augment.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="crop-flip: bounds of the crop's share of the image area.")
    crop_ratio: tuple[float, float] = Field((0.75, 1.33), description="crop-flip: bounds of the crop's aspect ratio (width / height).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    seed: int = Field(0, description="Seed for weight init and data order.")

    @model_validator(mode="after")
    def _crop_bounds(self) -> "ClassifierConfig":
        (s_lo, s_hi), (r_lo, r_hi) = self.crop_scale, self.crop_ratio
        if not 0 < s_lo <= s_hi <= 1:
            raise ValueError(f"classifier.crop_scale={list(self.crop_scale)}: need 0 < low <= high <= 1")
        if not 0 < r_lo <= r_hi:
            raise ValueError(f"classifier.crop_ratio={list(self.crop_ratio)}: need 0 < low <= high")
        return self


class HoldoutConfig(Section):
    """ASPIRE step 1: the held-out set of correctly classified training images."""

    fraction: float = Field(0.1, gt=0, le=1, description="p: fraction of correctly classified train images kept.")
    seed: int = Field(0, description="Seed of the sample.")


class CaptionConfig(Section):
    """ASPIRE step 2: caption each held-out image (https://arxiv.org/abs/2308.10103, Sec. 2(2))."""

    backend: Literal["git", "blip", "metadata"] = Field(
        "git", description="git (transformers GIT), blip (transformers BLIP) or metadata (the manifest's caption column)."
    )
    model: str = Field("microsoft/git-large-coco", description="Hub id or local folder of the captioning model.")
    batch_size: int = Field(16, ge=1, description="Images per generate() call.")
    max_length: int = Field(40, ge=2, description="Maximum caption length in tokens.")
    num_beams: int = Field(1, ge=1, description="Beam search width (1 = greedy).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Model weights dtype (half precision needs a GPU).")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")


class ExtractConfig(Section):
    """ASPIRE step 3: foreground objects, background and an alternative background per caption (Sec. 2(3), A.6)."""

    backend: Literal["openai", "rules"] = Field("openai", description="openai (any OpenAI-compatible server) or rules (offline).")
    model: str = Field("gpt-4o", description="openai: chat model name.")
    temperature: float = Field(0.0, ge=0, le=2, description="openai: sampling temperature (0 for reproducible answers).")
    base_url: str | None = Field(
        None, description="openai: server URL (e.g. http://localhost:8000/v1 for vLLM); default OPENAI_BASE_URL or OpenAI."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: name of the environment variable holding the API key (the key itself "
        "never goes into a config, a log or a cache file)."
    )
    captions_per_request: int = Field(10, ge=1, description="openai: (caption, label) pairs sent in one request.")
    timeout: float = Field(60.0, gt=0, description="openai: seconds before a request is abandoned and retried.")
    max_retries: int = Field(4, ge=0, description="openai: retries of 429/5xx/timeouts (exponential backoff, by the SDK).")
    max_repairs: int = Field(2, ge=0, description="openai: re-asks for items missing from or malformed in an answer.")
    max_failed: float = Field(0.5, ge=0, le=1, description="Stop the run when more than this fraction of the "
                              "captions failed (a down server, a wrong key); below it the failed ones are retried "
                              "on the next run.")
    prompt: str = Field("extract_prompt.txt", description="Prompt file in prompts/ (or a path).")
    exemplars: str = Field("extract_exemplars.jsonl", description="Annotated exemplars file in prompts/ (or a path).")
    alternatives: str = Field("alt_backgrounds.tsv", description="rules: background -> alternative background table.")
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Extra words naming each class (class name -> synonyms); foreground phrases naming the class are dropped.",
    )


class RemoveConfig(Section):
    """ASPIRE step 4a: ground each foreground phrase, segment it, dilate, inpaint, re-classify (Sec. 2(4.a), App. D)."""

    enabled: bool = Field(True, description="false: no object is removed (ASPIRE Table 2's ablation without step 4a).")
    ground: Literal["groundingdino", "hf-grounding-dino", "annotations"] = Field(
        "groundingdino", description="Grounder: groundingdino (groundingdino-py), hf-grounding-dino (transformers), "
        "annotations (the manifest's boxes column).")
    ground_model: str = Field("IDEA-Research/grounding-dino-base", description="hf-grounding-dino: hub id or local folder.")
    groundingdino_config: Path | None = Field(None, description="groundingdino: the model's python config file (e.g. GroundingDINO_SwinT_OGC.py).")
    groundingdino_checkpoint: Path | None = Field(None, description="groundingdino: the checkpoint (.pth).")
    text_encoder: str = Field("bert-base-uncased", description="groundingdino: BERT text encoder, hub id or local folder (offline use).")
    grounding: Literal["per-phrase", "joint"] = Field(
        "per-phrase", description="Grounding DINO prompts: per-phrase (one forward per phrase, as ASPIRE's Algorithm "
        "1) or joint (all of an image's phrases in one prompt, boxes assigned by token scores: faster, see BENCHMARKS.md).")
    ground_size: int | None = Field(None, ge=128, description="Grounding DINO (both grounders): the image's shorter "
                                    "side is resized to this (None: the model's own, the reference 800; smaller is "
                                    "faster on a CPU and less accurate).")
    ground_max_size: int | None = Field(None, ge=128, description="Grounding DINO: the longer side at most (None: the "
                                        "model's own, the reference 1333).")
    box_threshold: float = Field(0.3, ge=0, le=1, description="Grounding: minimum box score.")
    text_threshold: float = Field(0.25, ge=0, le=1, description="Grounding: minimum phrase-token score.")
    segment: Literal["sam", "hf-sam", "box", "grabcut"] = Field(
        "sam", description="Segmenter: sam (segment-anything), hf-sam (transformers), box (the box itself), grabcut (OpenCV).")
    sam_checkpoint: Path | None = Field(None, description="sam: segment-anything checkpoint (sam_vit_h_4b8939.pth, ...).")
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="sam: architecture of the checkpoint.")
    hf_sam_model: str = Field("facebook/sam-vit-huge", description="hf-sam: hub id or local folder.")
    inpaint: Literal["lama", "opencv"] = Field("lama", description="Inpainter: lama (simple-lama-inpainting, LAMA_MODEL) or opencv.")
    opencv_method: Literal["telea", "ns"] = Field("telea", description="opencv: Telea or Navier-Stokes inpainting.")
    dilate: int = Field(15, ge=0, description="Mask dilation kernel size in pixels (0: none); Hard-Spurious-ImageNet App. C uses 15.")
    min_box_fraction: float = Field(0.001, ge=0, lt=1, description="Boxes smaller than this fraction of the image are skipped.")
    max_mask_fraction: float = Field(0.9, gt=0, le=1, description="Masks covering more than this fraction are skipped (whole image).")
    max_side: int = Field(1024, ge=64, description="Images with a longer side are downscaled to it before editing.")
    batch_size: int = Field(8, ge=1, description="Images per inpainting / re-classification batch.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', ...")
    save_all: bool = Field(False, description="Also save edits that did not flip the prediction (for inspection).")


class BackgroundConfig(Section):
    """ASPIRE step 4b: change the background to the alternative one, re-classify (Sec. 2(4.b), A.6)."""

    enabled: bool = Field(True, description="false: no background is changed (ASPIRE Table 2's ablation without step 4b).")
    backend: Literal["instruct-pix2pix", "composite"] = Field(
        "instruct-pix2pix", description="instruct-pix2pix (diffusers) or composite (paste the foreground on a background bank image).")
    model: str = Field("timbrooks/instruct-pix2pix", description="instruct-pix2pix: hub id or local folder.")
    prompt: str = Field("background_prompt.txt", description="Prompt template file in prompts/ ({background}, {alt}).")
    text_cfg: float = Field(7.5, ge=1, description="instruct-pix2pix: text guidance scale (ASPIRE: 7.5).")
    image_cfg: float = Field(1.5, ge=1, description="instruct-pix2pix: image guidance scale (ASPIRE: 1.5).")
    steps: int = Field(50, ge=1, description="instruct-pix2pix: denoising steps.")
    scheduler: str | None = Field(None, description="instruct-pix2pix: diffusers scheduler class name (default: the model's).")
    resolution: int = Field(512, ge=32, description="instruct-pix2pix: images are resized to this (multiple of 8).")
    batch_size: int = Field(4, ge=1, description="Images per pipeline call.")
    dtype: Literal["auto", "float32", "float16"] = Field("auto", description="auto: float16 on GPU, float32 on CPU.")
    safety_checker: bool = Field(True, description="instruct-pix2pix: run the safety checker when the model has one.")
    seed: int = Field(0, description="Seed; each image gets its own generator seeded from this and its id.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', ...")
    bank: Path | None = Field(None, description="composite: folder with one sub-folder of images per background name.")


class CollapseConfig(Section):
    """Top-k selection: collapse near-identical phrases, keep the k most frequent groups per class (Sec. 2, Table 4)."""

    embedder: Literal["bow", "minilm", "glove"] = Field("bow", description="Phrase similarity: bow (stems), minilm, glove.")
    glove_path: Path | None = Field(None, description="glove: a GloVe vectors text file (word v1 v2 ...).")
    threshold: float | None = Field(
        None, gt=0, le=1, description="Cosine similarity to merge; default per embedder (bow 0.5, minilm 0.65, glove 0.9, see BENCHMARKS.md)."
    )
    top_k: int = Field(3, ge=1, description="Groups kept per class (ASPIRE: k=3).")
    min_flips: int = Field(
        5, ge=1, description="A top-k group counts as a spurious feature only when at least this many of its edits "
        "flipped the prediction ...")
    min_flip_rate: float = Field(
        0.05, ge=0, le=1, description="... and at least this fraction of its edits did ...")
    min_lift: float = Field(
        2.0, ge=0, description="... and the class's held-out captions name it at least this many times as often as "
        "the other classes' captions do (a correlation in the data); a class with no such group reports 'no spurious "
        "feature found' (its generator still learns from its top-k groups' kept edits: tasks.collapse.training_edits).")


class PersonalizeConfig(Section):
    """ASPIRE step 5: textual inversion of Stable Diffusion per class on the kept edits of its top-k groups
    (Sec. 2(5); Gal et al. 2023, https://arxiv.org/abs/2208.01618)."""

    backend: Literal["textual-inversion", "none"] = Field(
        "textual-inversion", description="textual-inversion (diffusers, in process) or none (the composite generator needs no model).")
    model: str = Field("runwayml/stable-diffusion-v1-5", description="Stable Diffusion v1.x: hub id or local folder.")
    placeholder: str = Field("<{class_name}>", description="Placeholder token per class ({class_name} is filled in).")
    initializer_token: str | None = Field(
        None, description="Token every class's new embedding starts from; default: the class's own label word (see "
        "initializer_tokens).")
    initializer_tokens: dict[str, str] = Field(
        default_factory=dict, description="Per class (class name -> one word of the tokenizer), the word its token "
        "starts from; wins over initializer_token. Default for a class not listed: its name's last word that is one "
        "token and not a negation (ASPIRE App. E.2: the token is the class label), else 'object'. Checked against "
        "the tokenizer before the run.")
    steps: int = Field(1000, ge=1, description="Optimisation steps per class (paper / reference code: 1000... 3000).")
    lr: float = Field(5e-4, gt=0, description="Learning rate (ASPIRE: 5e-4).")
    scale_lr: bool = Field(True, description="Multiply lr by batch_size x gradient_accumulation, as the reference code does.")
    batch_size: int = Field(1, ge=1, description="Images per step.")
    gradient_accumulation: int = Field(8, ge=1, description="Steps accumulated per optimiser update (batch_size x "
                                       "this = the effective batch; ASPIRE App. E.2: 8).")
    resolution: int = Field(512, ge=32, description="Training resolution (SD v1.x: 512).")
    repeats: int = Field(100, ge=1, description="How often each image is repeated per epoch of the dataloader.")
    min_images: int = Field(3, ge=1, description="Fewer kept edits in the top-k groups: use all of the class's kept edits; still fewer: skip the class with a reason.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU, none on CPU.")
    gradient_checkpointing: bool = Field(True, description="Gradient checkpointing of the UNet (GPU only).")
    seed: int = Field(0, description="Seed of noise, timesteps and data order.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', ...")


class GenerateConfig(Section):
    """ASPIRE step 5: n x new images per class without the spurious features (Sec. 2(5), App. A.4)."""

    backend: Literal["textual-inversion", "composite", "edits"] = Field(
        "textual-inversion", description="textual-inversion (Stable Diffusion with the learned tokens), composite "
        "(the class's core object pasted on backgrounds that are not among its spurious groups; CPU), or edits "
        "(no generation: the kept edits of the spurious groups themselves join the training set, ASPIRE Table 2's "
        "ablation).")
    per_class: PositiveFloat | list[PositiveFloat] | None = Field(
        None, description="Images per class as a multiple of the class's training images; default (None): 1x "
        "the class's training images without group labels, 1x the class's minority-group images with them (App. A.4). "
        "A list of multiples (e.g. [1, 2, 3]) is a search on validation, as ASPIRE Sec. 3 suggests: the largest is "
        "generated, the retrain stage trains one model per multiple on each class's first images and keeps the one "
        "with the best validation worst-group accuracy (then average; then the smaller multiple).")
    prompt: str = Field("generate_prompt.txt", description="Prompt template file in prompts/ ({token}, {class_name}).")
    steps: int = Field(50, ge=1, description="textual-inversion: denoising steps.")
    guidance: float = Field(7.5, ge=1, description="textual-inversion: classifier-free guidance scale.")
    resolution: int = Field(512, ge=32, description="textual-inversion: output size (multiple of 8).")
    batch_size: int = Field(4, ge=1, description="Images per pipeline call.")
    safety_checker: bool = Field(True, description="textual-inversion: drop images the safety checker flags (counted).")
    clip_filter: bool = Field(False, description="Drop generations that still match a top-k spurious phrase (CLIP).")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="clip_filter: CLIP hub id or local folder.")
    clip_threshold: float = Field(0.25, description="clip_filter: cosine similarity to a spurious phrase above which an image is dropped.")
    learn_from: Literal["kept-edits", "held-out"] = Field(
        "kept-edits", description="composite: the images the generator imitates (as textual inversion learns from "
        "them): kept-edits, the prediction-flipping edits of the class's top-k groups (ASPIRE); held-out, the "
        "class's held-out originals, a control (augmentation without discovery: it avoids nothing).")
    context_prior: float = Field(
        0.0, ge=0, le=1, description="composite: probability that a generated image's scene is a uniformly drawn "
        "background.bank image instead of its exemplar's own scene (a changed-background exemplar always takes a bank "
        "scene). 0: imitate the exemplars, as a token learned from them does; above 0, contexts vary whatever was "
        "discovered (an ablation: at 0.5 the no-discovery control matched ASPIRE on the demo, BENCHMARKS.md).")
    avoid_backgrounds: bool = Field(
        True, description="composite: an exemplar whose own background (the extract stage's phrase) names one of "
        "the class's spurious phrases takes a uniformly drawn background.bank scene, as its spurious objects are "
        "never pasted (the analogue of generate.clip_filter, which drops generations still showing a spurious "
        "phrase). false: keep that scene (an ablation: a class with an object and a background feature then keeps "
        "its spurious background in every object-removal exemplar).")
    carry_objects: float = Field(
        1.0, ge=0, le=1, description="composite: probability that a generated image shows its exemplar's other "
        "foreground objects (those not among the class's spurious phrases) beside the core object. 1: imitate the "
        "exemplars; below 1, objects are dropped whatever was discovered (an ablation).")
    image_size: int | None = Field(None, ge=16, description="composite: output size (default: the size of the source images).")
    object_scale: tuple[float, float] = Field((0.8, 1.2), description="composite: the core object is rescaled by a factor in this range.")
    seed: int = Field(0, description="Seed; every generated image records its own seed.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', ...")

    @field_validator("per_class")
    @classmethod
    def _one_or_several_multiples(cls, value: float | list[float] | None) -> float | list[float] | None:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list: give a multiple or a list of multiples")
        choices = sorted(set(value))
        if len({f"{m:g}" for m in choices}) < len(choices):  # each multiple's model is committed as <part>-x<m:g>
            raise ValueError(f"{value}: multiples this close print alike; give multiples that differ more")
        return choices if len(choices) > 1 else choices[0]

    @model_validator(mode="after")
    def _choices_need_generation(self) -> "GenerateConfig":
        if self.per_class_choices() and self.backend == "edits":
            raise ValueError("per_class: several multiples need a generator; backend 'edits' generates nothing "
                             "(its kept edits are a fixed set)")
        return self

    def per_class_choices(self) -> list[float] | None:
        """The multiples the retrain stage chooses from, when ``per_class`` lists several; else None."""
        return self.per_class if isinstance(self.per_class, list) else None


class RetrainConfig(Section):
    """ASPIRE step 6: retrain the classifier on the augmented set (Sec. 2(6)); settings default to ``classifier``."""

    method: Literal["erm", "jtt", "dfr", "groupdro", "clarify", "slim"] = Field(
        "erm", description="Training method: erm, or a robust trainer of aspire.robust (jtt, dfr, groupdro, clarify, slim).")
    epochs: int | None = Field(None, ge=1, description="Epochs (default: classifier.epochs).")
    seed: int | None = Field(None, description="Seed of weight init and data order (default: classifier.seed).")
    jtt_epochs: int = Field(1, ge=1, description="JTT: T, epochs of the identification model (JTT paper: 1-60).")
    jtt_upweight: int = Field(20, ge=1, description="JTT: lambda_up, copies of each error-set row (JTT paper: 20-100).")
    jtt_lr: float | None = Field(None, gt=0, description="JTT: learning rate of both stages (None: classifier.lr; "
                                 "JTT App. A: 1e-5 on Waterbirds and CelebA).")
    jtt_l2: float | None = Field(None, ge=0, description="JTT: weight decay of both stages (None: classifier."
                                 "weight_decay; JTT App. A: 1.0 Waterbirds, 0.1 CelebA).")
    groupdro_lr: float | None = Field(None, gt=0, description="Group DRO: learning rate (None: classifier.lr; "
                                      "Sagawa et al.: 1e-5 on Waterbirds and CelebA).")
    groupdro_step_size: float = Field(0.01, gt=0, description="Group DRO: step size of the group weights (paper: 0.01).")
    groupdro_l2: float | None = Field(None, ge=0, description="Group DRO: weight decay replacing classifier.weight_decay (strong L2, e.g. 1.0).")
    dfr_base: Literal["classifier", "train"] = Field(
        "classifier", description="DFR: the frozen backbone is the run's ERM model (classifier stage, no retraining) "
        "or an ERM model trained on the (original or augmented) train rows.")
    dfr_penalty: Literal["l1", "l2"] = Field(
        "l1", description="DFR: the head's penalty: l1 (DFR's Waterbirds/CelebA recipe) or l2 (the ImageNet-9 "
        "recipe the Corner Cases paper uses).")
    dfr_c: list[PositiveFloat] | None = Field(
        None, description="DFR: inverse penalty strengths tuned on half of validation (None: DFR's grid 1 .. 0.01; "
        "one value: no tuning, e.g. [0.01] for the Corner Cases paper's lambda = 100).")
    groups: Literal["auto", "labels", "phrases"] = Field(
        "auto", description="Groups for group-aware training and worst-group selection: labels (the dataset's "
        "group column), phrases (class x the run's top-k spurious phrase group its caption mentions, see "
        "aspire.groups), auto (labels when every row has one, else phrases).")
    groupdro_adjustment: float = Field(0.0, ge=0, description="Group DRO: group adjustment C (q update sees loss_g + C/sqrt(n_g); paper: 0-4).")
    groupdro_balanced: bool = Field(True, description="Group DRO: sample every group equally often (the paper code's --reweight_groups).")

    clarify_annotator: Literal["file", "simulated", "random"] = Field(
        "file", description="CLARIFY: file (a person's annotations from `aspire clarify`), simulated (the best-scoring "
        "extracted phrase per class) or random (a random extracted phrase per class: the control).")
    clarify_annotations: str | None = Field(
        None, description="CLARIFY: annotations YAML (default <workdir>/clarify/annotations.yaml).")
    clarify_similarity: Literal["caption-bow", "caption-minilm", "clip"] = Field(
        "caption-bow", description="CLARIFY: image-phrase similarity: clip (the paper's) or the image's caption "
        "against the phrase (bag of stems or MiniLM; close to an oracle on synthetic captions).")
    clarify_clip_model: str | None = Field(None, description="CLARIFY: CLIP hub id or local folder for similarity clip.")
    clarify_phrases: int = Field(
        1, ge=1, description="CLARIFY: phrases per class (1: the paper's; more: follow-up phrases, each on the errors "
        "the earlier ones leave, for classes with several spurious attributes). `aspire clarify` asks this many per "
        "class; the simulated and random annotators give this many.")
    clarify_mode: Literal["last-layer", "full"] = Field(
        "last-layer", description="CLARIFY: retrain the last layer on frozen reference features (the paper's) or the whole model.")
    clarify_variant: Literal["slice-balanced", "worst-slice"] = Field(
        "slice-balanced", description="CLARIFY: Eq. 2 slice weights, or Group DRO over the slices (whole model).")
    slim_mode: Literal["train", "val"] = Field(
        "val", description="SLIM: curate the training set and train on it (SLIM_Tr) or curate validation and "
        "retrain the last layer (SLIM_Val).")
    slim_annotator: Literal["file", "simulated", "random"] = Field(
        "file", description="SLIM: file (a person's answers from `aspire slim`), simulated (GradCAM mass in the object "
        "box), or random (a random subset of the curated size: the control).")
    slim_annotations: str | None = Field(
        None, description="SLIM: answers CSV (default <workdir>/slim/<mode>/annotations.csv).")
    slim_queries: int = Field(40, ge=1, description="SLIM: attention answers asked for (paper, Waterbirds: 120 Tr, 40 Val).")
    slim_budget: float = Field(0.1, gt=0, le=1, description="SLIM: curated set size as a fraction of the pool (paper: 0.05-0.3).")
    slim_flip_rate: float = Field(0.05, ge=0, le=1, description="SLIM, simulated annotator: probability an answer is flipped "
                                  "(the paper reports ~95% human consistency).")

    def annotation_path(self, method: str, workdir: Path) -> Path:
        """Where ``aspire clarify`` / ``aspire slim`` write the person's annotations and training reads them."""
        if method == "clarify":
            return Path(self.clarify_annotations or workdir / "clarify" / "annotations.yaml")
        return Path(self.slim_annotations or workdir / "slim" / self.slim_mode / "annotations.csv")

    def trainer_args(self, method: str, erm_model: str | None = None, workdir: Path | None = None,
                     candidates: list[str] | None = None) -> dict:
        """Keyword arguments of ``aspire.robust.make_trainer(method)`` from this section. ``erm_model``: the run's
        classifier-stage model file, DFR's frozen backbone when ``dfr_base`` is ``classifier`` and the reference
        model of CLARIFY and SLIM; ``workdir``: where their annotations are; ``candidates``: the run's extracted
        phrases, from which the simulated CLARIFY annotator chooses."""
        if method == "dfr":
            dfr = {"penalty": self.dfr_penalty, **({"c_grid": tuple(self.dfr_c)} if self.dfr_c else {})}
            return {**dfr, "base_model_path": erm_model} if self.dfr_base == "classifier" and erm_model else dfr
        if method == "clarify":
            return {"annotations": str(self.annotation_path(method, workdir or Path("."))), "annotator": self.clarify_annotator,
                    "candidates": list(candidates or []), "similarity": self.clarify_similarity,
                    "clip_model": self.clarify_clip_model, "mode": self.clarify_mode, "variant": self.clarify_variant,
                    "reference_model_path": erm_model, "phrases_per_class": self.clarify_phrases}
        if method == "slim":
            return {"mode": self.slim_mode, "annotator": self.slim_annotator,
                    "annotations": str(self.annotation_path(method, workdir or Path("."))),
                    "n_queries": self.slim_queries, "budget_fraction": self.slim_budget,
                    "flip_rate": self.slim_flip_rate, "reference_model_path": erm_model}
        if method == "jtt":
            return {"identification_epochs": self.jtt_epochs, "upweight": self.jtt_upweight, "lr": self.jtt_lr,
                    "l2": self.jtt_l2}
        if method == "groupdro":
            return {"step_size": self.groupdro_step_size, "l2": self.groupdro_l2, "balanced": self.groupdro_balanced,
                    "adjustment": self.groupdro_adjustment, "lr": self.groupdro_lr}
        return {}


class RunnerConfig(Section):
    """How shards are executed."""

    kind: Literal["threads", "dask"] = Field("threads", description="Prefect task runner: threads or dask.")
    address: str | None = Field(None, description="dask: scheduler address of an existing cluster (tcp://host:8786).")
    n_workers: int = Field(2, ge=1, description="threads: worker threads; dask: local cluster worker processes.")
    shard_size: int = Field(256, ge=1, description="Rows per shard: one Prefect task runs one shard.")


class RunConfig(Section):
    """The whole run: where outputs go, the dataset and every stage's settings."""

    workdir: Path = Field(description="Folder for all stage outputs, the report and the quarantine list.")
    dataset: DatasetConfig
    synth: SynthConfig | None = Field(
        None, description="When set, the synthetic benchmark is drawn into dataset.root if it is not there yet."
    )
    classifier: ClassifierConfig = ClassifierConfig()
    holdout: HoldoutConfig = HoldoutConfig()
    caption: CaptionConfig = CaptionConfig()
    extract: ExtractConfig = ExtractConfig()
    remove: RemoveConfig = RemoveConfig()
    background: BackgroundConfig = BackgroundConfig()
    collapse: CollapseConfig = CollapseConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    generate: GenerateConfig = GenerateConfig()
    retrain: RetrainConfig = RetrainConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _synth_needs_hf_format(self) -> "RunConfig":
        if self.synth is not None and self.dataset.format != "hf-imagefolder":
            raise ValueError("synth is set, so dataset.format must be 'hf-imagefolder' (what aspire synth writes)")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (``3``, ``1e-3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` set (intermediate sections created)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is {child!r}, not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``<file>: key.path = value: what was expected``."""
    lines = [f"{source}: invalid config"]
    for problem in error.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        shown = "<missing>" if problem["type"] == "missing" else repr(problem.get("input"))
        lines.append(f"  {key} = {shown}: {problem['msg']}")
    return "\n".join(lines)


# -- the Hard-Spurious-ImageNet compositor (``aspire compose``) ------------------------------------------

V2_BACKGROUNDS = ["n04251144", "n02860847", "n03733131", "n03992509", "n03447447", "n02817516", "n04540053",
                  "n02802426", "n02951358", "n09288635", "n12057211"]
"""Hard-Spurious-ImageNet-v2's highly spurious background classes (Sec. 4.1): snorkel, bobsled, maypole, potter's
wheel, gondola, bearskin, volleyball, basketball, canoe, geyser, yellow lady's slipper."""


class ComposeSource(Section):
    """Where the source images and their object boxes come from."""

    format: Literal["imagenet", "manifest"] = Field(
        "imagenet", description="imagenet: an ImageNet-style tree at root (see aspire.imagenet); manifest: the "
        "dataset section's rows with a boxes column (e.g. the synthetic benchmark).")
    root: Path | None = Field(None, description="imagenet: the tree's root (train/, val/, Annotations/ or LOC_*.csv).")
    boxes: Literal["auto", "voc", "csv"] = Field(
        "auto", description="imagenet: PASCAL VOC XML (Annotations/CLS-LOC) or LOC_<split>_solution.csv; auto: "
        "voc when Annotations/CLS-LOC exists.")
    dataset: DatasetConfig | None = Field(None, description="manifest: the dataset to read (any reader format).")
    classes: list[str] | None = Field(
        None, description="Foreground classes (wnids or synset names; manifest: class names); default all.")

    @model_validator(mode="after")
    def _check(self) -> "ComposeSource":
        if self.format == "imagenet" and self.root is None:
            raise ValueError("source.format=imagenet needs source.root")
        if self.format == "manifest" and self.dataset is None:
            raise ValueError("source.format=manifest needs source.dataset")
        return self


class SplitCounts(Section):
    """Images per class and group (Hard-Spurious-ImageNet Sec. 5, Table 11)."""

    train_easy: int = Field(80, ge=0, description="Train images per Easy group (CeO, CoO at 84 and 112 px).")
    train_other: int = Field(10, ge=0, description="Train images per Medium or Hard group.")
    val: int = Field(20, ge=0, description="Val images per group.")
    test: int = Field(50, ge=0, description="Test images per group.")


class ComposeSettings(Section):
    """How images are composed."""

    sizes: list[int] = Field([56, 84, 112], min_length=1, description="Object sizes in pixels (square side, or "
                             "the shorter side when aspect=preserve).")
    canvas: int = Field(224, ge=32, description="Side of the square output images and backgrounds.")
    aspect: Literal["square", "preserve"] = Field(
        "square", description="square: the object crop resized to size x size; preserve: the test split's objects "
        "keep their aspect ratio, shorter side to size, longer side clamped to the canvas (train and val stay "
        "square: the paper's AR-preserving variant is a test set, Sec. 4).")
    test_corner: Literal["top-right", "random"] = Field(
        "top-right", description="Corner of the test split's Co groups: top-right (as train/val) or a random corner.")
    variant: Literal["v1", "v2"] = Field(
        "v1", description="v1: R backgrounds from random other classes; v2: each class's R backgrounds from one "
        "class of v2_backgrounds (Sec. 4.1).")
    v2_backgrounds: list[str] = Field(V2_BACKGROUNDS, description="v2: background classes (wnids or names).")
    mask: Literal["box", "segmenter"] = Field(
        "box", description="box: objects are their boxes; segmenter: masks from remove.segment prompted by the "
        "box (the paper's SAM variant, App. E), the object pasted with its mask as alpha.")
    counts: SplitCounts = SplitCounts()
    jpeg_quality: int = Field(95, ge=1, le=100, description="Quality of the composed JPEGs.")
    seed: int = Field(0, description="Seed of the source picks, backgrounds and corners.")

    @model_validator(mode="after")
    def _check_sizes(self) -> "ComposeSettings":
        bad = [s for s in self.sizes if not 1 <= s <= self.canvas]
        if bad:
            raise ValueError(f"sizes {bad}: must be between 1 and canvas ({self.canvas})")
        if len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes {self.sizes}: repeated size")
        return self


class ComposeRunConfig(Section):
    """``aspire compose``: the Hard-Spurious-ImageNet compositor's whole config."""

    workdir: Path = Field(description="Folder for the cached stages (backgrounds, compositions) and reports.")
    output: Path | None = Field(None, description="Image folder written at the end (default <workdir>/dataset).")
    source: ComposeSource
    compose: ComposeSettings = ComposeSettings()
    remove: RemoveConfig = Field(RemoveConfig(inpaint="opencv", segment="box"), description=(
        "Object removal: segment (the inpainting masks: sam as the paper, box the boxes; with compose.mask="
        "segmenter also the pasted objects' alpha), dilate (15), inpaint, device."))
    runner: RunnerConfig = RunnerConfig()


PATH_KEYS = ("workdir", "dataset.root", "background.bank", "remove.groundingdino_config",
             "remove.groundingdino_checkpoint", "remove.sam_checkpoint", "collapse.glove_path", "source.root",
             "source.dataset.root", "output")


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the file and folder keys (``PATH_KEYS``) absolute, relative to ``base``."""
    for dotted in PATH_KEYS:
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str((base / node[key]).resolve())
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: list[str] | None = None, base: Path | None = None,
                model: type[BaseModel] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides and validate it.

    Args:
        path: YAML file.
        overrides: ``section.key=value`` strings applied before validation.
        base: folder that relative paths are taken from; default the current directory, so a config
            run from the repository root finds ``data/...`` there.
        model: the config class (default :class:`RunConfig`; :class:`ComposeRunConfig` for ``aspire compose``).

    Raises:
        ConfigError: the file is missing or not YAML, or a key/value is invalid (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.constructor.ConstructorError as exc:
        line = f", line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(f"{path}{line}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    data = _resolve_paths(apply_overrides(data, overrides or []), base or Path.cwd())
    try:
        return (model or RunConfig).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
