"""Robust trainers (aspire.robust): ERM, JTT, DFR and Group DRO on a tiny synthetic benchmark, on CPU."""

from collections import Counter

import numpy as np
import pytest
import torch

from aspire.config import ClassifierConfig
from aspire.robust import (
    TRAINERS,
    DFRTrainer,
    ERMTrainer,
    GroupDROTrainer,
    JTTTrainer,
    evaluate,
    grid_search,
    make_trainer,
)
from aspire.robust.base import predict_rows, selection_key
from aspire.robust.dfr import balanced_subset, strip_head
from aspire.robust.group_dro import dro_update
from aspire.synth import SynthConfig, draw_benchmark

CONFIG = ClassifierConfig(arch="small-cnn", image_size=32, epochs=3, lr=0.05, batch_size=32, device="cpu")
KWARGS = {"erm": {}, "jtt": {"identification_epochs": 1, "upweight": 4}, "dfr": {"n_refits": 3}, "groupdro": {}}
# DFR without a base model trains its own ERM model (history = that model's epochs).


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and much faster when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """3 classes x 4 backgrounds x object/no object = 24 groups; train is mostly the majority groups."""
    rows = draw_benchmark(SynthConfig(image_size=32, train_per_class=60, val_per_group=2, test_per_group=2),
                          tmp_path_factory.mktemp("synth"))
    return {split: [row for row in rows if row["split"] == split] for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def erm(bench):
    return ERMTrainer().train(bench["train"], bench["val"], CONFIG, seed=0)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float()) for k in sa)


def test_every_trainer_is_registered():
    assert set(TRAINERS) == {*KWARGS, "clarify", "slim"}  # CLARIFY and SLIM (no group labels) have their own tests


@pytest.mark.parametrize("method", sorted(KWARGS))
def test_every_trainer_trains_and_selects_on_worst_group_val_acc(bench, method):
    config = CONFIG.model_copy(update={"epochs": 2})
    result = make_trainer(method, **KWARGS[method]).train(bench["train"], bench["val"], config, seed=0)
    preds = predict_rows(result.model, bench["test"], CONFIG)
    assert len(preds) == len(bench["test"]) and set(preds) <= {0, 1, 2}
    assert len(result.history) == config.epochs
    assert all(r["val_worst_group_acc"] is not None and r["val_avg_acc"] is not None for r in result.history)
    keys = [selection_key(r, by_group=True) for r in result.history]
    assert result.best_epoch == keys.index(max(keys))  # first epoch with the best (worst-group, avg) val acc
    report = evaluate(result.model, bench["test"], CONFIG)
    assert report["n"] == len(bench["test"]) and len(report["per_group"]) == 24


def test_best_epoch_weights_are_the_ones_returned(bench, erm):
    """The returned model scores what the history says its best epoch scored."""
    report = evaluate(erm.model, bench["val"], CONFIG)
    assert report["worst_group_acc"] == erm.history[erm.best_epoch]["val_worst_group_acc"]
    assert report["avg_acc"] == erm.history[erm.best_epoch]["val_avg_acc"]


def test_without_val_rows_the_last_epoch_is_kept(bench):
    result = ERMTrainer().train(bench["train"], [], CONFIG.model_copy(update={"epochs": 2}), seed=0)
    assert result.best_epoch == 1 and result.history[-1]["val_worst_group_acc"] is None


def test_jtt_with_upweight_one_is_erm(bench, erm):
    jtt = JTTTrainer(identification_epochs=1, upweight=1).train(bench["train"], bench["val"], CONFIG, seed=0)
    assert same_weights(jtt.model, erm.model)
    assert predict_rows(jtt.model, bench["test"], CONFIG) == predict_rows(erm.model, bench["test"], CONFIG)
    assert [h["loss"] for h in jtt.history] == pytest.approx([h["loss"] for h in erm.history])


def test_jtt_error_set_is_the_misclassified_training_rows(bench):
    train = bench["train"]
    jtt = JTTTrainer(identification_epochs=1, upweight=3).train(train, bench["val"], CONFIG, seed=0)
    identifier = ERMTrainer().train(train, [], CONFIG.model_copy(update={"epochs": 1}), seed=0).model  # T epochs
    wrong = [row["image_id"] for row, pred in zip(train, predict_rows(identifier, train, CONFIG)) if pred != row["label"]]
    assert jtt.extras["error_set"] == wrong and 0 < len(wrong) < len(train)
    assert jtt.extras["n_train_rows"] == len(train) + 2 * len(wrong)  # each error row 3 times in all


def generated_with_wrong_labels(train: list, n: int = 30) -> list:
    """Generated rows (ASPIRE's augmentations) that a first stage would get wrong: train images, labels shifted."""
    return [{**row, "image_id": f"gen::{i}", "source": "generated", "label": (row["label"] + 1) % 3, "group": None}
            for i, row in enumerate(train[:n])]


def test_two_stage_methods_see_the_generated_images_in_their_second_stage_only(bench, erm):
    """ASPIRE App. A.4: JTT identifies its error set, and DFR trains its base ERM model, on the original rows; the
    generated rows join JTT's upweighted training and DFR's last-layer fit."""
    train, generated = bench["train"], generated_with_wrong_labels(bench["train"])
    alone = JTTTrainer(identification_epochs=1, upweight=3).train(train, bench["val"], CONFIG, seed=0)
    both = JTTTrainer(identification_epochs=1, upweight=3).train(train + generated, bench["val"], CONFIG, seed=0)
    assert both.extras["error_set"] == alone.extras["error_set"]  # identification never saw the generated rows
    assert not any(i.startswith("gen::") for i in both.extras["error_set"])
    assert both.extras["n_train_rows"] == len(train) + len(generated) + 2 * len(alone.extras["error_set"])
    dfr = DFRTrainer(n_refits=1).train(train + generated, bench["val"], CONFIG, seed=0)
    assert [h["loss"] for h in dfr.history] == pytest.approx([h["loss"] for h in erm.history])  # base ERM: originals


def test_jtt_grid_search_keeps_the_best_worst_group_val_acc(bench):
    config = CONFIG.model_copy(update={"epochs": 1})
    best, table = grid_search(bench["train"], bench["val"], config, seed=0, Ts=[1], lambdas=[1, 5])
    assert [(r["T"], r["upweight"]) for r in table] == [(1, 1), (1, 5)]
    chosen = best.history[best.best_epoch]
    assert chosen["val_worst_group_acc"] == max(r["val_worst_group_acc"] for r in table)
    with pytest.raises(ValueError, match="val_rows"):
        grid_search(bench["train"], [], config, seed=0, Ts=[1], lambdas=[1])


def test_dfr_keeps_the_backbone_and_fits_the_head_on_balanced_subsets(bench, erm):
    before = {k: v.clone() for k, v in erm.model.state_dict().items()}
    dfr = DFRTrainer(base_model=erm.model, n_refits=3).train(bench["train"], bench["val"], CONFIG, seed=0)
    assert all(torch.equal(before[k], v) for k, v in erm.model.state_dict().items())  # base model untouched
    backbone, head = dfr.model[0], dfr.model[1]
    features = {k: v for k, v in before.items() if not k.startswith("fc.")}
    assert all(torch.equal(features[k], v) for k, v in backbone.state_dict().items()) and len(features) == len(backbone.state_dict())
    assert head.out_features == 3 and not torch.equal(head.weight, erm.model.fc.weight)
    groups = {row["image_id"]: row["group"] for row in bench["val"]}
    assert len(dfr.extras["refit_subsets"]) == 3
    for subset in dfr.extras["refit_subsets"]:
        counts = Counter(groups[i] for i in subset)
        assert len(counts) == 24 and len(set(counts.values())) == 1  # every group, equally often
    assert [r["C"] for r in dfr.extras["c_table"]] == list(DFRTrainer().c_grid)
    assert len(predict_rows(dfr.model, bench["test"], CONFIG)) == len(bench["test"])


def test_dfr_l2_head_with_one_c_is_not_tuned(bench, erm):
    """retrain.dfr_penalty=l2 with dfr_c=[0.01]: the Corner Cases paper's ImageNet-9 recipe (lambda = 100)."""
    from aspire.config import RetrainConfig

    args = RetrainConfig(dfr_penalty="l2", dfr_c=[0.01], dfr_base="train").trainer_args("dfr")
    assert args == {"penalty": "l2", "c_grid": (0.01,)}
    dfr = DFRTrainer(base_model=erm.model, n_refits=2, **args).train(bench["train"], bench["val"], CONFIG, seed=0)
    assert dfr.extras["c_table"] == [] and dfr.extras["best_c"] == 0.01
    l1 = DFRTrainer(base_model=erm.model, n_refits=2, c_grid=(0.01,)).train(bench["train"], bench["val"], CONFIG, seed=0)
    assert not torch.equal(dfr.model[1].weight, l1.model[1].weight)
    assert (l1.model[1].weight == 0).float().mean() > (dfr.model[1].weight == 0).float().mean()  # l1: sparse head
    with pytest.raises(ValueError, match="penalty='l3'"):
        DFRTrainer(penalty="l3")
    with pytest.raises(ValueError, match="dfr_c"):
        RetrainConfig(dfr_c=[0.0])


def test_dfr_on_a_saved_erm_model_fits_its_head_on_val_and_generated_rows(bench, erm, tmp_path):
    from aspire.classifier import save_model

    save_model(erm.model, tmp_path / "model.pt", CONFIG, ["dog", "bird", "car"])
    generated = [{**row, "image_id": f"gen-{row['image_id']}", "source": "generated", "group": 100 + row["label"]}
                 for row in bench["test"][:12]]
    dfr = DFRTrainer(base_model_path=str(tmp_path / "model.pt"), n_refits=2).train(
        bench["train"] + generated, bench["val"], CONFIG, seed=0)
    assert dfr.history == [] and dfr.best_epoch is None  # no ERM trained here: the saved backbone is used
    features = {k: v for k, v in erm.model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(features[k], v) for k, v in dfr.model[0].state_dict().items())
    for subset in dfr.extras["refit_subsets"]:  # the generated rows' groups are balanced in with the others
        assert sum(i.startswith("gen-") for i in subset) > 0
    without = DFRTrainer(base_model_path=str(tmp_path / "model.pt"), n_refits=2, generated_in_head=False).train(
        bench["train"] + generated, bench["val"], CONFIG, seed=0)
    assert not any(i.startswith("gen-") for s in without.extras["refit_subsets"] for i in s)


def test_dfr_helpers():
    import numpy as np

    subset = balanced_subset(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2]), np.random.default_rng(0))
    assert Counter(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])[subset].tolist()) == {0: 2, 1: 2, 2: 2}
    from aspire.classifier import build_model

    resnet = build_model(ClassifierConfig(arch="resnet18"), 2)
    assert strip_head(resnet)(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    with pytest.raises(ValueError, match="no final linear layer"):
        strip_head(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


def test_group_dro_needs_groups(bench):
    rows = [{**row, "group": None} if i == 5 else row for i, row in enumerate(bench["train"])]
    with pytest.raises(ValueError, match="'group'.*synth-train-000005"):
        GroupDROTrainer().train(rows, bench["val"], CONFIG, seed=0)


def test_group_dro_weights_are_a_distribution_that_favours_the_worst_groups(bench):
    from aspire.robust.group_dro import GroupDROLoss

    q = dro_update(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 3.0]), step_size=0.01)
    assert q.sum().item() == pytest.approx(1.0) and q[1] > 0.5 > q[0]
    loss = GroupDROLoss(torch.tensor([0, 0, 1, 1, 2]), 3, step_size=0.5)
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0], [1.0, 0.0]])  # group 1 is wrong
    labels = torch.zeros(5, dtype=torch.long)
    for _ in range(5):
        value = loss(logits[:4], labels[:4], torch.arange(4))  # group 2 absent from these batches
    assert loss.q[1] > 0.9 and loss.q.sum().item() == pytest.approx(1.0)
    losses = torch.nn.functional.cross_entropy(logits[:4], labels[:4], reduction="none")
    assert value.item() == pytest.approx(loss.q[0].item() * losses[:2].mean().item() + loss.q[1].item() * losses[2:].mean().item(), rel=1e-5)

    # The group adjustment C / sqrt(n_g): with equal losses the smaller group gains weight.
    adjusted = GroupDROLoss(torch.tensor([0] * 16 + [1] * 4), 2, step_size=0.5, adjustment=1.0)
    even = torch.zeros(2, 2)
    adjusted(even, torch.zeros(2, dtype=torch.long), torch.tensor([0, 16]))
    assert adjusted.q[1] > adjusted.q[0]

    result = GroupDROTrainer(step_size=0.01).train(bench["train"], bench["val"], CONFIG, seed=0)
    weights = result.extras["q"]
    assert set(weights) == {row["group"] for row in bench["train"]}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(sum(r["q"].values()) == pytest.approx(1.0) for r in result.history)


def test_sample_weights_draw_groups_equally_often(bench):
    from aspire.classifier import build_model, fit

    train = bench["train"]
    sizes = Counter(row["group"] for row in train)
    seen: Counter = Counter()

    def recording_loss(logits, labels, index):
        seen.update(train[i]["group"] for i in index.tolist())
        return torch.nn.functional.cross_entropy(logits, labels)

    config = CONFIG.model_copy(update={"epochs": 4})
    fit(build_model(config, 3), train, [], config, 0, loss_fn=recording_loss,
        sample_weights=[1 / sizes[row["group"]] for row in train])
    assert sum(seen.values()) == 4 * len(train)
    expected = 4 * len(train) / len(sizes)
    assert all(0.4 * expected < seen[g] < 1.8 * expected for g in sizes), seen  # vs sizes from 1 to ~50
    with pytest.raises(ValueError, match="sample_weights: 2 weights for"):
        fit(build_model(config, 3), train, [], config, 0, sample_weights=[1.0, 1.0])


@pytest.mark.parametrize("method", ["erm", "groupdro"])
def test_same_config_and_seed_give_the_same_result(bench, method):
    rng_before = torch.get_rng_state()
    config = CONFIG.model_copy(update={"epochs": 2})
    a = make_trainer(method).train(bench["train"], bench["val"], config, seed=1)
    b = make_trainer(method).train(bench["train"], bench["val"], config, seed=1)
    assert same_weights(a.model, b.model) and a.history == b.history
    if method == "erm":
        c = make_trainer(method).train(bench["train"], bench["val"], config, seed=2)
        assert not same_weights(a.model, c.model)
    assert torch.equal(rng_before, torch.get_rng_state())  # no global seeding


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method='sgd'"):
        make_trainer("sgd")
    with pytest.raises(ValueError, match="upweight=0"):
        JTTTrainer(upweight=0)
    with pytest.raises(ValueError, match="train_rows: no rows"):
        ERMTrainer().train([], [], CONFIG, seed=0)
    with pytest.raises(ValueError, match="step_size"):
        GroupDROTrainer(step_size=0)


def test_selection_uses_worst_group_when_val_has_groups_else_average():
    high_avg = {"val_avg_acc": 0.9, "val_worst_group_acc": 0.1}
    high_worst = {"val_avg_acc": 0.8, "val_worst_group_acc": 0.5}
    assert selection_key(high_worst, by_group=True) > selection_key(high_avg, by_group=True)
    assert selection_key(high_avg, by_group=False) > selection_key(high_worst, by_group=False)


def test_dfr_half_split_of_single_row_groups_leaves_an_empty_integer_half():
    from aspire.robust.dfr import half_split

    first, second = half_split(np.array(["a", "b", "b"]), np.random.default_rng(0))
    assert first.dtype.kind == "i" and second.dtype.kind == "i" and len(first) == 2 and len(second) == 1
    first, second = half_split(np.array(["a", "b"]), np.random.default_rng(0))
    assert second.dtype.kind == "i" and len(second) == 0  # usable as an index: C is then not tuned
