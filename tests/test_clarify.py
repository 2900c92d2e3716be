"""CLARIFY: the error score, slice weights, annotation files, similarity backends (tiny CLIP) and the trainer."""

import numpy as np
import pytest
import torch
from tiny_models import draw_splits, save_tiny_clip

from aspire.config import ClassifierConfig
from aspire.robust import make_trainer
from aspire.robust.clarify import (
    Annotation,
    CaptionSimilarity,
    ClipSimilarity,
    error_score,
    read_annotations,
    score_phrases,
    simulated_annotations,
    slice_names,
    slice_weights,
    uncovered,
    with_absences,
    write_annotations,
)
from aspire.phrases import BowEmbedder
from aspire.robust.erm import ERMTrainer

CONFIG = ClassifierConfig(arch="small-cnn", image_size=32, epochs=2, lr=0.05, batch_size=32, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread on the shared CPU


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return draw_splits(tmp_path_factory.mktemp("synth"), image_size=32, train_per_class=40, val_per_group=2,
                       test_per_group=1)


def test_error_score_is_one_for_a_perfect_separator_and_near_zero_for_a_shuffled_one():
    rng = np.random.default_rng(0)
    errors = np.arange(400) < 100
    sims = np.where(errors, 0.9, 0.1) + rng.normal(0, 0.01, 400)
    score, tau = error_score(sims, errors)
    assert score == pytest.approx(1.0) and sims[~errors].max() <= tau < sims[errors].min()
    shuffled, _ = error_score(sims, rng.permutation(errors))
    assert shuffled < 0.2
    assert error_score(sims, np.zeros(400, bool)) == (0.0, pytest.approx(sims.max()))


def test_error_score_at_a_given_tau_is_the_balanced_accuracy_there():
    sims = np.array([0.1, 0.2, 0.6, 0.7, 0.8])
    errors = np.array([False, True, True, False, True])
    # tau 0.5: P(sim > tau | error) = 2/3, P(sim <= tau | correct) = 1/2 -> Acc 7/12, score 2 (7/12 - 1/2) = 1/6
    assert error_score(sims, errors, tau=0.5) == (pytest.approx(1 / 6), 0.5)
    best, tau = error_score(sims, errors)
    assert best >= 1 / 6 and tau in sims


def test_slice_weights_balance_the_slices_of_annotated_classes_only():
    classes = ["dog"] * 10 + ["bird"] * 6
    slices = ["dog|snow"] * 8 + ["dog|not snow"] * 2 + ["bird"] * 6
    w = slice_weights(classes, slices)
    assert w[:8].sum() == pytest.approx(w[8:10].sum()) == pytest.approx(5.0)  # half of the class's total each
    assert np.allclose(w[10:], 1.0) and w.mean() == pytest.approx(1.0)


def test_caption_similarity_and_slices(bench):
    similarity = CaptionSimilarity(BowEmbedder())
    rows = bench["val"][:12]
    sims = similarity.scores(rows, ["snow"])[:, 0]
    assert all((s > 0) == ("snow" in r["caption"]) for r, s in zip(rows, sims))
    names = slice_names(rows, [Annotation("dog", "snow", 0.0)], similarity)
    assert {n for r, n in zip(rows, names) if r["class_name"] != "dog"} <= {"bird", "car"}
    assert all(n == ("dog|snow" if "snow" in r["caption"] else "dog|not snow")
               for r, n in zip(rows, names) if r["class_name"] == "dog")
    generated = {**rows[0], "class_name": "dog", "source": "generated", "caption": None}  # no caption needed
    assert slice_names([generated], [Annotation("dog", "snow", 0.0)], similarity) == ["dog|generated"]
    with pytest.raises(ValueError, match="needs a caption on every row"):
        similarity.scores([{**rows[0], "caption": None}], ["snow"])


def test_clip_similarity_loads_a_saved_clip_by_path(bench, tmp_path):
    clip = ClipSimilarity(str(save_tiny_clip(tmp_path / "clip")), device="cpu")
    sims = clip.scores(bench["val"][:3], ["snow", "a boat"])
    assert sims.shape == (3, 2) and np.all(np.abs(sims) <= 1.0 + 1e-5)
    assert np.allclose(clip.scores(bench["val"][1:2], ["a boat"]), sims[1:2, 1:], atol=1e-5)


def test_annotations_round_trip_and_bad_files_name_the_entry(tmp_path):
    path = tmp_path / "a.yaml"
    kept = [Annotation("dog", "snow", 0.25, 0.8), Annotation("bird", "a sled", 0.1, 0.5)]
    write_annotations(path, kept)
    assert read_annotations(path, ["dog", "bird"]) == kept
    path.write_text("annotations:\n  - {class: dog, phrase: snow, tau: 0.2}\n  - {class: cat, phrase: x, tau: 0.1}\n")
    with pytest.raises(ValueError, match=r"a.yaml: annotation 2: class 'cat'"):
        read_annotations(path, ["dog", "bird"])
    path.write_text("annotations:\n  - {class: dog, phrase: snow, tau: high}\n")
    with pytest.raises(ValueError, match=r"annotation 1: tau must be a number"):
        read_annotations(path, ["dog"])
    with pytest.raises(ValueError, match="no CLARIFY annotations file"):
        read_annotations(tmp_path / "missing.yaml")
    two = [Annotation("dog", "snow", 0.25, 0.8), Annotation("dog", "a sled", 0.1, 0.5)]  # a follow-up phrase
    write_annotations(path, two)
    assert read_annotations(path, ["dog"]) == two
    path.write_text("annotations:\n  - {class: dog, phrase: snow, tau: 0.2}\n  - {class: dog, phrase: snow, tau: 0.1}\n")
    with pytest.raises(ValueError, match=r"annotation 2: class 'dog' has the phrase 'snow' twice"):
        read_annotations(path, ["dog"])


def test_simulated_annotator_picks_the_phrase_that_predicts_errors(bench):
    val = bench["val"]
    # errors exactly on the dog images whose caption mentions snow: 'snow' must win over the other phrases
    preds = [(r["label"] + 1) % 3 if r["class_name"] == "dog" and "snow" in r["caption"] else r["label"] for r in val]
    found = simulated_annotations(val, preds, ["grass", "snow", "a boat"], CaptionSimilarity(BowEmbedder()))
    assert [(a.class_name, a.phrase) for a in found] == [("dog", "snow")]
    assert found[0].error_score == pytest.approx(1.0)
    # errors on dog images in snow or on grass (any wording): the simulated person adds terms while the score rises
    wrong = lambda r: r["class_name"] == "dog" and r["scene"] in ("snow", "grass")  # noqa: E731
    preds = [(r["label"] + 1) % 3 if wrong(r) else r["label"] for r in val]
    similarity = CaptionSimilarity(BowEmbedder())
    words = ["snow", "snowy", "grass", "lawn", "green field", "a boat"]
    (found,) = simulated_annotations(val, preds, words, similarity)
    alone = [a for a in simulated_annotations(val, preds, words, similarity, pick="random") if a.class_name == "dog"][0]
    single = max(s for _, s, _ in score_phrases(val, preds, "dog", words, similarity))
    assert len(found.phrase.split(", ")) >= 2 and found.error_score > single
    assert ", " not in alone.phrase  # the control: one random candidate


def _two_attribute_rows():
    """dog images on grass / snow / sand with or without a sled (3 each), wrong on grass without the sled and on
    snow with it: two attributes, as in a class with a spurious background and a spurious object; 4 cats."""
    rows = [{"class_name": "dog", "label": 0, "caption": f"a dog on the {scene}" + (" with a sled" if sled else ""),
             "scene": scene, "sled": sled} for scene in ("grass", "snow", "sand") for sled in (False, True) for _ in range(3)]
    rows += [{"class_name": "cat", "label": 1, "caption": "a cat on the sand", "scene": "sand", "sled": False}] * 4
    wrong = [r["class_name"] == "dog" and (r["scene"], r["sled"]) in (("grass", False), ("snow", True)) for r in rows]
    return rows, [1 - r["label"] if w else r["label"] for r, w in zip(rows, wrong)]


def test_an_absence_describes_errors_on_images_without_the_object():
    rows, _ = _two_attribute_rows()
    similarity = CaptionSimilarity(BowEmbedder())
    sims = similarity.scores(rows, ["a sled", "no sled", "without a sled", "grass"])
    assert np.allclose(sims[:, 1], -sims[:, 0]) and np.allclose(sims[:, 2], -sims[:, 0])
    # the dog is wrong exactly where its sled is missing: "a sled" scores 0 (its errors lie below tau), "no sled" 1
    preds = [1 - r["label"] if r["class_name"] == "dog" and not r["sled"] else r["label"] for r in rows]
    scored = dict((p, s) for p, s, _ in score_phrases(rows, preds, "dog", ["a sled", "no sled"], similarity))
    assert scored == {"a sled": 0.0, "no sled": pytest.approx(1.0)}
    found = Annotation("dog", "no sled", *error_score(similarity.scores(rows[:18], ["no sled"])[:, 0],
                                                      np.array([not r["sled"] for r in rows[:18]]))[::-1])
    assert found.error_score == pytest.approx(1.0) and with_absences(["grass", "a sled"]) == ["grass", "a sled",
                                                                                            "no grass", "no sled"]
    names = slice_names(rows, [found], similarity)
    assert all(n == ("dog|not no sled" if r["sled"] else "dog|no sled") for r, n in zip(rows, names)
               if r["class_name"] == "dog")


def test_follow_up_phrases_describe_the_errors_the_first_leaves():
    rows, preds = _two_attribute_rows()
    similarity, words = CaptionSimilarity(BowEmbedder()), ["grass", "snow", "sand", "a sled"]
    (one,) = simulated_annotations(rows, preds, words, similarity)  # the paper's budget: one phrase per class
    first, second = simulated_annotations(rows, preds, words, similarity, phrases_per_class=3)
    assert first == one and second.class_name == "dog" and not set(second.phrase.split(", ")) & set(first.phrase.split(", "))
    # the follow-up is scored on the images the first leaves uncovered (there it separates the errors perfectly) ...
    left, left_preds = uncovered(rows, preds, [first], similarity)
    assert 0 < len(left) < len(rows) and second.error_score == pytest.approx(1.0) and one.error_score < 1.0
    assert score_phrases(left, left_preds, "dog", [second.phrase], similarity)[0][1] == pytest.approx(1.0)
    # ... a third is not asked for: nothing wrong is left uncovered; the slices are the combinations of both phrases
    names = slice_names(rows, [first, second], similarity)
    assert {n for n in names if n.startswith("dog")} <= {f"dog|{a}{first.phrase}|{b}{second.phrase}"
                                                         for a in ("", "not ") for b in ("", "not ")}
    assert len({n for n in names if n.startswith("dog")}) >= 3 and set(names) - {n for n in names if n.startswith("dog")} == {"cat"}
    control = [a for a in simulated_annotations(rows, preds, words, similarity, "random", phrases_per_class=2)
               if a.class_name == "dog"]
    assert len(control) == 2 and control[0].phrase != control[1].phrase  # the control spends the same budget


def test_the_person_is_asked_for_a_follow_up_on_what_is_left(bench, tmp_path):
    from flows.annotate import _ask_class

    val = bench["val"]
    wrong = lambda r: r["class_name"] == "dog" and r["scene"] in ("snow", "sand")  # noqa: E731
    preds = [(r["label"] + 1) % 3 if wrong(r) else r["label"] for r in val]
    typed, prompts, said = iter(["snowy, snow", "", "desert, sand, sandy", ""]), [], []
    ask = lambda prompt: prompts.append(prompt) or next(typed)  # noqa: E731
    kept = _ask_class("dog", val, preds, CaptionSimilarity(BowEmbedder()), ["snow"], ask, said.append, 2, tmp_path)
    assert [a.phrase for a in kept] == ["snowy, snow", "desert, sand, sandy"]
    assert "also often wrong" in prompts[-1] and "also" not in prompts[0]
    assert (tmp_path / "montage-dog-2.png").is_file() and any("do not cover are wrong" in s for s in said)
    assert kept[1].error_score == pytest.approx(1.0)  # on the images 'snowy, snow' leaves, sand explains every error


@pytest.mark.parametrize("mode,variant", [("last-layer", "slice-balanced"), ("full", "slice-balanced"),
                                          ("last-layer", "worst-slice")])
def test_clarify_trainer_trains_on_annotated_slices(bench, tmp_path, mode, variant):
    reference = ERMTrainer().train(bench["train"], bench["val"], CONFIG, seed=0).model
    path = tmp_path / "ann.yaml"
    write_annotations(path, [Annotation("dog", "snow", 0.0, 0.5)])
    trainer = make_trainer("clarify", annotations=str(path), reference_model=reference, mode=mode, variant=variant)
    result = trainer.train(bench["train"], bench["val"], CONFIG, seed=0)
    assert result.extras["budget"] == {"phrases": 1}
    assert set(result.extras["train_slices"]) == {"dog|snow", "dog|not snow", "bird", "car"}
    logits = result.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    if mode == "last-layer" and variant == "slice-balanced":
        assert result.extras["best_c"] in (0.01, 0.1, 1.0, 10.0, 100.0) and len(result.extras["c_table"]) == 5
        assert torch.equal(result.model[0].features[0].weight, reference.features[0].weight)  # frozen backbone


def test_clarify_arguments_are_checked():
    with pytest.raises(ValueError, match="needs an annotations file"):
        make_trainer("clarify", annotator="file")
    with pytest.raises(ValueError, match="needs candidate phrases"):
        make_trainer("clarify", annotator="simulated")
