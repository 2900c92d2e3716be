"""Groups for datasets without group labels, from the ASPIRE run's top-k spurious phrase groups.

Group-aware trainers (Group DRO, DFR) and worst-group selection need a group per image. When the dataset has
none, the run's collapse stage gives, per class, its top-k groups of spurious phrases (ASPIRE Sec. 2(5),
Table 4). An image's group is then its class and the highest-ranked of its class's phrase groups that its
caption mentions, or ``none`` when it mentions none of them: k + 1 groups per class, the last one (no spurious
feature mentioned) playing the minority group.

A caption mentions a phrase when every root word of the phrase (:func:`~aspire.phrases.phrase_root`:
determiners dropped, Porter stems, "snowy" folded into "snow") is among the caption's root words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from aspire.manifest import Row
from aspire.phrases import phrase_root

NONE = "none"
UNCAPTIONED = "uncaptioned"


def root_words(text: str) -> set[str]:
    """The root words of ``text`` ("Two dogs in the snowy field" -> {"dog", "in", "snow", "field"})."""
    return set(phrase_root(text).split())


def mentioned_group(caption: str, phrase_groups: Sequence[Sequence[str]]) -> int | None:
    """Index of the first group with a phrase the caption mentions, or ``None``."""
    words = root_words(caption)
    for index, phrases in enumerate(phrase_groups):
        if any(root_words(p) and root_words(p) <= words for p in phrases):
            return index
    return None


def phrase_groups(rows: Sequence[Row], spurious: dict[str, list[list[str]]],
                  captions: dict[str, str | None]) -> tuple[list[Row], dict[str, int]]:
    """Rows with ``group`` (int) and ``group_name`` ("<class>:<first phrase of its group>", "<class>:none", or
    "<class>:uncaptioned" when ``captions`` has no caption for the row's ``image_id``).

    Args:
        rows: manifest rows with ``image_id``, ``label`` and ``class_name``.
        spurious: the collapse stage's ``spurious`` summary, {class name: [[phrases of group 1], ...]}, best first.
        captions: {image_id: caption or None}.

    Returns:
        (rows, group sizes by name). Group ids are ``label * (k + 2) + j`` with j the phrase group's rank, k for
        ``none`` and k + 1 for ``uncaptioned`` (k: the largest number of groups of any class).
    """
    k = max((len(groups) for groups in spurious.values()), default=0)
    out = []
    for row in rows:
        groups = spurious.get(row["class_name"], [])
        caption = captions.get(row["image_id"])
        if caption is None:
            j, name = k + 1, UNCAPTIONED
        else:
            j = mentioned_group(caption, groups)
            j, name = (k, NONE) if j is None else (j, groups[j][0])
        out.append({**row, "group": int(row["label"]) * (k + 2) + j, "group_name": f"{row['class_name']}:{name}"})
    return out, dict(sorted(Counter(r["group_name"] for r in out).items()))
