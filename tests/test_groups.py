"""Groups from the run's top-k spurious phrases (aspire.groups, tasks.retrain) for datasets without group labels."""

import pytest

from aspire.config import CaptionConfig, RetrainConfig
from aspire.groups import mentioned_group, phrase_groups
from aspire.synth import SynthConfig, draw_benchmark
from tasks.retrain import assign_groups, group_mode, group_rows


def test_a_caption_mentions_a_phrase_when_it_has_all_its_root_words():
    groups = [["orange sled", "sled"], ["snowy field", "snow"]]
    assert mentioned_group("two dogs with an orange sled in the snow", groups) == 0  # best-ranked group wins
    assert mentioned_group("a husky beside sleds", groups) == 0  # plural stems to the same root
    assert mentioned_group("a dog team on a snowy lawn", groups) == 1  # "snowy" folds into "snow"
    assert mentioned_group("a dog on the grass", groups) is None
    assert mentioned_group("a dog in a field", [["snowy field"]]) is None  # every root word is needed


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    config = SynthConfig(image_size=32, train_per_class=30, val_per_group=1, test_per_group=1)
    return config, draw_benchmark(config, tmp_path_factory.mktemp("synth"))


def spurious_of(config: SynthConfig) -> dict[str, list[list[str]]]:
    """Per class: its planted object's and background's wordings, object first (the shape of a collapse summary)."""
    objects = {o.name: o for o in config.objects}
    backgrounds = {b.name: b for b in config.backgrounds}
    return {c.name: [[c.object, *objects[c.object].words], [c.background, *backgrounds[c.background].words]]
            for c in config.classes}


def test_phrase_groups_recover_the_planted_groups_of_the_synthetic_benchmark(rows):
    config, rows = rows
    planted = {c.name: c for c in config.classes}
    grouped, sizes = phrase_groups(rows, spurious_of(config), {r["image_id"]: r["caption"] for r in rows})
    for row in grouped:
        spec = planted[row["class_name"]]
        want = spec.object if row["has_object"] else spec.background if row["scene"] == spec.background else "none"
        assert row["group_name"] == f"{row['class_name']}:{want}", row["caption"]
    ids = {(r["group"], r["group_name"]) for r in grouped}
    assert len(ids) == len({name for _, name in ids}) == 9  # 3 classes x (object, background, none), distinct ids
    assert sum(sizes.values()) == len(rows)


def test_assign_groups_keeps_labels_or_uses_phrases_and_keeps_labelled_test_groups(rows):
    config, rows = rows
    captions = {r["image_id"]: r["caption"] for r in rows}
    assert group_mode(rows, "auto") == "labels"
    same, info = assign_groups(rows, "auto", spurious_of(config), captions)
    assert same == rows and info == {"groups": "labels"}
    grouped, info = assign_groups(rows, "phrases", spurious_of(config), captions)
    assert info["groups"] == "phrases" and info["test_groups"] == "labels"
    for before, after in zip(rows, grouped):
        if before["split"] == "test":
            assert after == before
        else:
            assert after["group_name"].startswith(before["class_name"] + ":")

    unlabelled = [{k: v for k, v in r.items() if k not in ("group", "group_name")} for r in rows]
    assert group_mode(unlabelled, "auto") == "phrases"
    with pytest.raises(ValueError, match="retrain.groups=labels: .* rows have no 'group'"):
        group_mode(unlabelled, "labels")
    grouped, info = assign_groups(unlabelled, "auto", spurious_of(config), captions)
    assert info["test_groups"] == "phrases" and all(r["group"] is not None for r in grouped)


def test_group_rows_needs_the_collapse_stage_and_sends_uncaptioned_rows_to_their_own_group(rows, tmp_path):
    from aspire.cache import StageStore

    config, rows = rows
    unlabelled = [{k: v for k, v in r.items() if k not in ("group", "group_name", "caption")} for r in rows]
    store = StageStore(tmp_path, "train", "k")
    with pytest.raises(ValueError, match="collapse stage .* is not committed"):
        group_rows(store, unlabelled, RetrainConfig(), CaptionConfig(backend="metadata"), None, [])
    # The caption stage captioned two rows; with the metadata backend the rest cannot be captioned.
    stage = [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows[:2]]
    grouped, info = group_rows(store, unlabelled, RetrainConfig(), CaptionConfig(backend="metadata"),
                               spurious_of(config), stage)
    names = [r["group_name"] for r in grouped]
    assert not names[0].endswith(":uncaptioned") and not names[1].endswith(":uncaptioned")
    assert all(n.endswith(":uncaptioned") for n in names[2:])
    assert info["captioned_here"] == 0
