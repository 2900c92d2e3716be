import pytest

from aspire.metrics import group_accuracy


def row(label, pred, group=None, name="c"):
    return {"label": label, "pred": pred, "group": group, "class_name": name}


def test_group_accuracy_reports_worst_group():
    rows = [row(0, 0, 0), row(0, 0, 0), row(1, 0, 1), row(1, 1, 1), row(1, 0, 2)]
    result = group_accuracy(rows)
    assert result["avg_acc"] == 3 / 5
    assert result["per_group"] == {"0": 1.0, "1": 0.5, "2": 0.0}
    assert (result["worst_group"], result["worst_group_acc"]) == ("2", 0.0)


def test_rows_without_groups_fall_back_to_classes():
    result = group_accuracy([row(0, 0, name="cat"), row(1, 0, name="dog")])
    assert result["per_group"] == {"class:cat": 1.0, "class:dog": 0.0}


def test_empty():
    assert group_accuracy([])["avg_acc"] is None


def test_average_weighted_by_training_groups_as_the_waterbirds_papers_report():
    """Balanced test groups, imbalanced training groups: the weighted average follows the training shares."""
    test = [{"label": 0, "class_name": "a", "group": g, "pred": p} for g, preds in ((0, [0, 0, 0, 0]), (1, [0, 1, 1, 1]))
            for p in preds]  # group 0: 100%, group 1: 25%
    train = [{"label": 0, "class_name": "a", "group": 0}] * 9 + [{"label": 0, "class_name": "a", "group": 1}]
    result = group_accuracy(test, train_rows=train)
    assert result["avg_acc"] == pytest.approx(0.625)
    assert result["weighted_avg_acc"] == pytest.approx(0.9 * 1.0 + 0.1 * 0.25)
    assert "weighted_avg_acc" not in group_accuracy(test)


def test_lost_images_say_where_they_went_and_how_the_models_treated_the_context():
    """Two cats on grass are lost to fox. Before, the model called every other class's image on grass without
    objects "cat" (right on the cats because of the grass); after, none. A fox with a ball on grass is another
    context; rows without a scene have none."""
    from aspire.metrics import lost_images

    names = {0: "cat", 1: "fox", 2: "owl"}

    def row(i, label, scene, pred, objects=()):
        return {"image_id": f"{i}", "split": "test", "label": label, "class_name": names[label], "pred": pred,
                "group": label, "group_name": f"{names[label]}|{scene}", "scene": scene, "objects": list(objects)}

    before = [row(0, 0, "grass", 0), row(1, 0, "grass", 0), row(2, 0, "grass", 0), row(3, 1, "grass", 0),
              row(4, 2, "grass", 0), row(5, 1, "grass", 1, ["ball"]), row(6, 1, "grass", 1)]
    after = [row(0, 0, "grass", 1), row(1, 0, "grass", 1), row(2, 0, "grass", 0), row(3, 1, "grass", 1),
             row(4, 2, "grass", 2), row(5, 1, "grass", 0, ["ball"]), row(6, 1, "grass", 1)]
    lost = lost_images(before, after)
    assert lost["0:cat|grass"] == {"lost_to": {"fox": 2}, "context": {"images": 3, "before": 2 / 3, "after": 0.0},
                                   "drawn_to": {"class": "fox", "of": "cat", "images": 1, "before": 0.0,
                                                "after": 0.0}}  # the owl
    assert lost["1:fox|grass"] == {"lost_to": {"cat": 1}, "context": None, "drawn_to": None}  # nobody else has a ball
    assert set(lost) == {"0:cat|grass", "1:fox|grass"}  # owl gained, lost nothing
    # more images of the contexts (a cue probe): an owl with a ball, and an owl on grass the after model calls cat;
    # they join the contexts and are never counted as lost
    probe = {"before": [row("p0", 2, "grass", 1, ["ball"]), row("p1", 2, "grass", 2)],
             "after": [row("p0", 2, "grass", 2, ["ball"]), row("p1", 2, "grass", 0)]}
    with_probe = lost_images(before, after, probed=probe)
    assert with_probe["1:fox|grass"]["context"] == {"images": 1, "before": 1.0, "after": 0.0}
    assert with_probe["0:cat|grass"]["context"] == {"images": 4, "before": 2 / 4, "after": 1 / 4}
    assert set(with_probe) == set(lost)
    for rows in (before, after):  # Waterbirds-style: the place alone (the fox with a ball now shares it)
        for r in rows:
            r["place"] = r.pop("scene")
            r.pop("objects")
    assert lost_images(before, after)["0:cat|grass"]["context"] == {"images": 4, "before": 2 / 4, "after": 1 / 4}
    before, after = ([{k: v for k, v in r.items() if k != "place"} for r in rows] for rows in (before, after))
    assert lost_images(before, after)["0:cat|grass"] == {"lost_to": {"fox": 2}, "context": None, "drawn_to": None}


def test_lost_images_tell_a_new_shortcut_to_the_class_they_went_to():
    """Augmentation taught the model "sand means fox": the dogs on sand it lost went to fox, and so did the owls
    and cats on sand it had right; the foxes on sand do not count (fox is their class)."""
    from aspire.metrics import lost_images

    names = {0: "dog", 1: "fox", 2: "owl", 3: "cat"}

    def row(i, label, pred):
        return {"image_id": f"{i}", "split": "test", "label": label, "class_name": names[label], "pred": pred,
                "group": label, "group_name": f"{names[label]}|sand", "scene": "sand", "objects": []}

    labels = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    before = [row(i, label, label) for i, label in enumerate(labels)]
    after = [row(i, label, 1 if label != 0 or i < 2 else 0) for i, label in enumerate(labels)]
    after[8]["pred"] = 3  # one cat kept
    lost = lost_images(before, after)["0:dog|sand"]
    assert lost["lost_to"] == {"fox": 2}
    assert lost["drawn_to"] == {"class": "fox", "of": "dog", "images": 4, "before": 0.0, "after": 3 / 4}
    assert lost["context"] == {"images": 6, "before": 0.0, "after": 0.0}  # nobody else was called dog
    # the third dog lost to cat: a tie, decided by where the context goes (fox), not by the name; a class the
    # test split does not have ("7") cannot be tested
    after[2]["pred"] = 3
    lost = lost_images(before, after)["0:dog|sand"]
    assert lost["lost_to"] == {"fox": 2, "cat": 1} and lost["drawn_to"]["class"] == "fox"
    after[0]["pred"] = after[1]["pred"] = 7
    lost = lost_images(before, after)["0:dog|sand"]
    assert lost["lost_to"] == {"7": 2, "cat": 1}  # the foxes and owls on sand: none called cat
    assert lost["drawn_to"] == {"class": "cat", "of": "dog", "images": 4, "before": 0.0, "after": 0.0}
