"""Stage keys: which folder each stage's output lives in, for a config and an input.

Keys chain by content: a stage's input digest is the digest of its upstream stage's committed output, so a
change that leaves an upstream output identical (touching image files, a new shard size) reruns nothing
downstream, and a config change reruns its stage and what is downstream, never what is upstream.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from aspire.cache import StageStore, stage_key
from aspire.config import RunConfig
from aspire.manifest import Row, digest
from tasks import (
    background,
    caption,
    classifier,
    collapse,
    export,
    extract,
    generate,
    holdout,
    ingest,
    remove,
    retrain,
)

STAGES = ("ingest", "classifier", "holdout", "caption", "extract", "remove", "background", "collapse",
          "personalize", "generate", "export", "retrain")


def stage_spec(config: RunConfig, name: str) -> tuple[int, Any, str]:
    """(version, the config that changes the stage's output, backend identity) of a stage."""
    specs: dict[str, Callable[[], tuple[int, Any, str]]] = {
        "ingest": lambda: (ingest.VERSION, config.dataset, "pil"),
        "classifier": lambda: (classifier.VERSION, classifier.key_config(config.classifier),
                               classifier.classifier_identity(config.classifier)),
        "holdout": lambda: (holdout.VERSION, config.holdout, "numpy"),
        "caption": lambda: (caption.VERSION, config.caption, caption.captioner_identity(config.caption)),
        "extract": lambda: (extract.VERSION, config.extract.model_dump(mode="json", exclude={"timeout", "max_retries"}),
                            extract.extractor_identity(config.extract)),
        "remove": lambda: (remove.VERSION, config.remove.model_dump(mode="json", exclude={"device", "batch_size"}),
                           remove_identity(config)),
        "background": lambda: (background.VERSION, config.background.model_dump(mode="json", exclude={"device", "batch_size"}),
                               background.editor_identity(config.background, config.remove)),
        "collapse": lambda: (collapse.VERSION, config.collapse, config.collapse.embedder),
        "personalize": lambda: personalize_spec(config),
        "generate": lambda: (generate.VERSION, config.generate.model_dump(mode="json", exclude={"device", "batch_size"}),
                             generate_identity(config)),
        "export": lambda: (export.VERSION, {"format": config.dataset.format}, "imagefolder"),
        "retrain": lambda: (retrain.VERSION, classifier.key_config(retrain.retrain_config(config.classifier, config.retrain)),
                            f"{config.retrain.method}: {classifier.classifier_identity(config.classifier)}"),
    }
    return specs[name]()


def remove_identity(config: RunConfig) -> str:
    from tasks.grounders import grounder_identity
    from tasks.inpainters import inpainter_identity
    from tasks.segmenters import segmenter_identity

    return " | ".join((grounder_identity(config.remove), segmenter_identity(config.remove),
                       inpainter_identity(config.remove)))


def personalize_spec(config: RunConfig) -> tuple[int, Any, str]:
    if config.personalize.backend == "none":
        return 1, {"backend": "none"}, "none"
    from tasks import personalize

    return (personalize.VERSION, config.personalize.model_dump(mode="json", exclude={"device"}),
            personalize.personalize_identity(config.personalize))


def generate_identity(config: RunConfig) -> str:
    if config.generate.backend == "edits":
        return "edits"
    if config.generate.backend == "composite":
        from tasks.grounders import grounder_identity
        from tasks.inpainters import inpainter_identity
        from tasks.segmenters import segmenter_identity

        # the bank serves the prior and every changed-background exemplar, whatever context_prior is
        bank = background.BackgroundBank(config.background.bank).identity if config.background.bank else "no bank"
        return f"composite: {grounder_identity(config.remove)} | {segmenter_identity(config.remove)} | " \
               f"{inpainter_identity(config.remove)} | {bank}"
    from tasks.generate_sd import clip_identity, generator_identity

    clip = clip_identity(config.generate) if config.generate.clip_filter else "no clip filter"
    return f"{generator_identity(config.generate, config.personalize.model)} | {clip}"


def store_for(config: RunConfig, name: str, input_digest: str) -> StageStore:
    """The store of stage ``name`` for this config and input."""
    return StageStore(config.workdir, name, stage_key(name, *stage_spec(config, name), input_digest))


def chain(config: RunConfig, listing: list[Row]) -> Iterator[tuple[str, StageStore]]:
    """Committed-so-far walk of the stage chain: yields each stage's store while its upstream is committed.

    The caller may run a stage between two steps: the next store is computed from the committed output."""
    input_digest = ingest.listing_digest(listing)
    for name in STAGES:
        store = store_for(config, name, input_digest)
        yield name, store
        marker = store.stage_marker()
        if marker is None:
            return
        input_digest = marker["digest"]
        if name == "collapse":  # generate reads the claims and the top-k phrases from its summary, not its rows
            input_digest = digest([input_digest, marker["summary"].get("spurious"), marker["summary"].get("top_k")])


