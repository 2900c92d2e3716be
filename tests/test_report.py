"""The run report: groups that got worse after augmentation, and classes with no spurious feature claimed."""

from aspire.report import build_report, render_markdown, worse_groups


def evaluation(per_group: dict[str, float]) -> dict:
    worst = min(per_group, key=per_group.get)
    return {"avg_acc": sum(per_group.values()) / len(per_group), "worst_group_acc": per_group[worst],
            "worst_group": worst, "per_group": per_group, "n": 10 * len(per_group)}


def test_groups_more_than_five_points_worse_are_listed():
    before = evaluation({"cat/grass": 1.0, "cat/sofa": 0.2, "fox/grass": 0.9})
    after = evaluation({"cat/grass": 0.94, "cat/sofa": 0.9, "fox/grass": 0.86})
    assert worse_groups(before, after) == {"cat/grass": [1.0, 0.94]}  # 6 points; fox's 4 points are not
    assert worse_groups(before, None) == {}


def test_report_shows_the_rule_flip_rates_and_the_classes_without_a_feature():
    collapse = {"spurious": {"cat": [["ball"]]}, "no_spurious_found": ["fox"], "rule": "RULE",
                "top_k": {"cat": [{"phrases": ["ball"], "count": 12, "tried": 40, "flip_rate": 0.3, "confident": True,
                                   "mentioned": 0.8, "mentioned_elsewhere": 0.1},
                                  {"phrases": ["grass"], "count": 6, "tried": 200, "flip_rate": 0.03, "confident": False}],
                          "fox": [{"phrases": ["rock"], "count": 4, "tried": 30, "flip_rate": 0.1333, "confident": False}]},
                "flipped": {}}
    before = evaluation({"cat/grass": 1.0, "fox/grass": 0.9})
    after = evaluation({"cat/grass": 0.5, "fox/grass": 0.9})
    report = build_report({"holdout": {"before": {"test": before}}, "collapse": collapse, "retrain": {"after": {"test": after}}})
    assert report["worse_groups"] == {"cat/grass": [1.0, 0.5]} and report["no_spurious_found"] == ["fox"]
    text = render_markdown(report)
    assert "Rule: RULE" in text and "| cat | 1 | 12 / 40 | 30.0% | 80.0% / 10.0% | yes | ball |" in text
    assert "| cat | 2 | 6 / 200 | 3.0% | n/a / n/a | no | grass |" in text
    assert "**fox: no spurious feature found**" in text and "cat/grass 100.0% -> 50.0%" in text
