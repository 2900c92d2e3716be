"""Tests of the benchmark suite's tables (bench/suite.py) on saved results: the worse groups of each arm and
what the report says each one is."""

from pathlib import Path

from bench.suite import table, worse_table


def result(worse: dict) -> dict:
    run = {"before": {"worst_group_acc": 0.0, "avg_acc": 0.8}, "after": {"worst_group_acc": 0.6, "avg_acc": 0.9},
           "planted_in_top_k": 2, "planted_found": 2, "planted_total": 2, "claimed": {"cat": [["ball"]]},
           "edits_kept": 9, "minutes": 1.0}
    return {**run, "worse_groups": worse}


def test_the_worse_groups_table_counts_each_arms_groups_by_what_they_lost_to():
    drawn = {"class": "fox", "images": 8, "before": 0.0, "after": 0.1}
    context = {"after": 0.7, "p": 0.01, "from_context": True, "drawn_to": drawn, "shortcut": None}
    new = {"after": 0.7, "p": 0.2, "from_context": False, "drawn_to": drawn, "shortcut": "new"}
    plain = {"after": 0.7, "p": 0.5, "from_context": False, "drawn_to": drawn, "shortcut": None}
    results = {"d1/aspire/0": result({"0:cat|grass": context}), "d1/aspire/1": result({"0:cat|grass": context}),
               "d1/no-discovery/0": result({"0:cat|grass": new, "1:fox|sand": plain, "2:owl|sand": {**new, "shortcut": "kept"}}),
               "d2/aspire/0": result({}), "d2/no-discovery/0": result({})}
    draws = [Path("d1.yaml"), Path("d2.yaml")]
    lines = worse_table(results, draws, [0, 1]).splitlines()
    assert lines[2] == "| (b) no discovery | 2 | 3 | 0 | 0 | 1 | 1 | 1 | 0 of 0 (3 without a ceiling run) |"
    assert lines[3] == "| (c) ASPIRE | 3 | 2 | 2 | 2 | 0 | 0 | 0 | 0 of 0 (2 without a ceiling run) |"
    # the balanced-data model of --ceiling: cat/grass at 0.7 after is within 5 points of 0.75, fox/sand not of 0.9
    results["d1/ceiling"] = {"worst_group_acc": 0.5, "avg_acc": 0.8,
                             "per_group": {"0:cat|grass": 0.75, "1:fox|sand": 0.9, "2:owl|sand": 0.5}}
    lines = worse_table(results, draws, [0, 1]).splitlines()
    assert lines[2].endswith("| 2 of 3 |") and lines[3].endswith("| 2 of 2 |")
    # saved before the test, not testable (two classes), an old [before, after]: none counts as "none of these"
    results["d2/aspire/0"]["worse_groups"] = {"3:ant|hill": {"p": 0.3, "from_context": False},
                                              "4:bee|hill": {**plain, "drawn_to": None}, "5:elk|hill": [1.0, 0.8]}
    assert worse_table(results, draws, [0, 1]).splitlines()[3] == (
        "| (c) ASPIRE | 3 | 5 (3 not tested for a shortcut) | 2 | 2 | 0 | 0 | 0 | 2 of 2 (3 without a ceiling run) |")
    results["d1/aspire/1"]["worse_groups"] = {"1:fox|sand": new}
    assert "0:cat/grass* (context), 1:fox/sand (new shortcut)" in table(results, draws, [0, 1])


def test_a_draw_run_without_control_b_is_listed_with_b_not_run():
    results = {"d1/aspire/0": result({}), "d1/aspire/1": {**result({}), "after": {"worst_group_acc": 0.8, "avg_acc": 0.9}},
               "d2/aspire/0": result({}), "d2/no-discovery/0": result({})}
    rows = table(results, [Path("d1.yaml"), Path("d2.yaml"), Path("d3.yaml")], [0, 1]).splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [["| d1", "0 / 2"], ["| d2", "1 / 1"]]  # d3 never ran: no row
    assert "| 0.0 / not run / 70.0 ± 14.1 |" in rows[0]


def test_a_fresh_draw_keeps_its_settings_when_a_name_is_taken():
    from bench.suite import fresh_draw

    first = fresh_draw(61_000, set())
    taken = {first["classes"][0]["name"], first["backgrounds"][-1]["name"]}
    second = fresh_draw(61_000, set(taken))  # fresh_draw adds the names it draws to the set
    names = [c["name"] for c in second["classes"]] + [b["name"] for b in second["backgrounds"]]
    assert not taken & set(names)  # the taken words are redrawn ...

    def settings(draw: dict) -> dict:  # ... and nothing else changes: shapes, colours, textures, strength, size
        return {**draw, "classes": [c["shape"] for c in draw["classes"]], "objects": [o["color"] for o in draw["objects"]],
                "backgrounds": [(b["texture"], b["colors"]) for b in draw["backgrounds"]]}

    assert settings(second) == settings(first)
    assert [c["name"] for c in second["classes"]][1:] == [c["name"] for c in first["classes"]][1:]
