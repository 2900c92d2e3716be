"""The ``rules`` extraction backend: offline, no network, no downloaded data.

A shallow version of the "traditional NLP" route of ASPIRE Appendix A.3, without a tagger (nltk's taggers
need data that PyPI does not carry): the caption is tokenised (Treebank), cut into noun phrases at function
words, verbs and prepositions, and each phrase is tagged by the preposition that introduced it.

The rule is structural, with no vocabulary of scenes: a phrase introduced by a place preposition
(in/on/at/by/near/under ...) is a place, unless a possessive marks it as part of someone ("in his hand",
"on her head"). Captions go from the specific to the general ("a cat on a couch in a living room"), so the
last place is the predominant background and earlier places are things in it (foreground objects); every
other noun phrase is a foreground object. "an old violin beside a ladder in the harbor" gives foreground
``[old violin, ladder]`` and background ``harbor`` whatever the words. The alternative background comes from
the contrast table ``prompts/alt_backgrounds.tsv`` (its ``*`` line for places it does not list).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from aspire.config import ExtractConfig
from aspire.lazy import porter_stemmer
from aspire.manifest import digest
from tasks.extract import BatchResult, Extraction, ExtractItem, prompt_file

PLACE_PREPOSITIONS = {"in", "on", "at", "under", "underneath", "beneath", "inside", "outside", "over", "across",
                      "along", "against", "through", "atop", "among", "around", "above", "down"}
"""Prepositions of containment or surface: the phrase after one is where the scene is."""
NEAR_PREPOSITIONS = {"by", "near"}
"""Prepositions of proximity: a place only when the caption names no other place ("a man next to a river"),
else a thing beside the subject ("a cow on the grass near a fence")."""
SCENE_PREPOSITIONS = PLACE_PREPOSITIONS | NEAR_PREPOSITIONS
RELATIONAL = {"side", "middle", "edge", "top", "front", "back", "background", "foreground", "distance", "corner",
              "center", "centre", "bottom", "rest"}
"""Nouns of position: "the side of the road" is the road; "in the background" alone is no place."""
OBJECT_PREPOSITIONS = {"with", "beside", "behind", "holding", "carrying", "and", "or", "of", "to", "from", "for",
                       "into", "onto", "toward", "towards", "while", "as", "like", "without", "between"}
MULTIWORD = {("next", "to"): "near", ("in", "front", "of"): "beside", ("on", "top", "of"): "on",
             ("close", "to"): "near", ("in", "the", "middle", "of"): "in"}
DETERMINERS = {"a", "an", "the", "some", "this", "that", "these", "those", "his", "her", "their", "its", "my",
               "our", "your", "another", "other", "each", "every"}
POSSESSIVES = {"his", "her", "their", "its", "my", "our", "your"}
"""A place phrase with a possessive ("in his hand") names part of someone, not the scene."""
PART_OF = "part-of"
"""The tag of a place phrase a possessive turned into a thing."""
VERBS = {"is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "sits", "stands", "lies",
         "looks", "walks", "runs", "flies", "swims", "rides", "plays", "holds", "can", "there", "who", "which",
         "that", "what", "it", "they", "he", "she", "very", "up", "out", "off", "together"}
ING_NOUNS = {"building", "ceiling", "painting", "clothing", "ring", "wing", "swing", "thing", "morning", "evening",
             "string", "railing", "awning", "spring", "king", "sibling", "pudding", "stuffing", "icing", "wedding",
             "landing", "clearing", "parking", "sing", "bring"}
META_PREFIX = re.compile(r"\b(?:an? |the )?(?:close[- ]?up|photo|photograph|picture|image|view|shot|drawing) of\b")
ED_NOUNS = {"bread", "thread", "seabed", "flowerbed", "riverbed", "sacred", "hundred", "naked"}
COLLECTIVES = {"flock", "group", "team", "herd", "pack", "pair", "couple", "bunch", "pile", "row", "crowd",
               "school", "swarm", "set", "lot", "lots", "stack", "line", "bowl", "plate", "cup", "glass", "box"}


@lru_cache(maxsize=1)
def _tokenizer():
    from nltk.tokenize import TreebankWordTokenizer  # nltk imports in about 1.5 s: not when only keying a stage

    return TreebankWordTokenizer()


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _is_verb(word: str) -> bool:
    return word in VERBS or (word.endswith("ing") and word not in ING_NOUNS and len(word) > 4)


def rules_identity(config: ExtractConfig) -> str:
    """The rules version and the digest of the contrast table they read."""
    return f"rules:v2:{digest(prompt_file(config.alternatives).read_text())}"


def _is_participle(word: str) -> bool:
    """A trailing verb form such as "parked" or "covered" (but not "sled", "bed", "red" or "bread")."""
    return word.endswith("ed") and len(word) > 4 and word not in ED_NOUNS


class RulesExtractor:
    """Noun phrases as foreground, the scene phrase as background, an alternative from a contrast table."""

    def __init__(self, config: ExtractConfig) -> None:
        alt_file = prompt_file(config.alternatives)
        self.alternatives: list[tuple[str, str]] = []
        for line in _read_list(alt_file):
            head, _, alt = line.partition("\t")
            if not alt:
                raise ValueError(f"{alt_file}: line {line!r} needs 'background<TAB>alternative'")
            self.alternatives.append((head.strip(), alt.strip()))
        self.identity = rules_identity(config)

    # 1. tokens -> (preposition, phrase words) chunks
    def chunks(self, caption: str) -> list[tuple[str | None, list[str]]]:
        text = META_PREFIX.sub(" ", caption.lower()).replace("-", " - ")
        tokens = [t for t in _tokenizer().tokenize(text) if t != "-"]
        out: list[tuple[str | None, list[str]]] = []
        preposition: str | None = None
        current: list[str] = []
        i = 0
        while i < len(tokens):
            multi = next((m for m in MULTIWORD if tuple(tokens[i : i + len(m)]) == m), None)
            word = tokens[i]
            if multi or word in SCENE_PREPOSITIONS or word in OBJECT_PREPOSITIONS or _is_verb(word) \
                    or not re.match(r"^[a-z0-9']+$", word):
                if word == "of" and current and current[-1] in COLLECTIVES:  # "a flock of birds"
                    current.append(word)
                    i += 1
                    continue
                if word == "of" and current and all(w in RELATIONAL for w in current):  # "the side of the road"
                    current = []
                    i += 1
                    continue
                if current:
                    out.append((preposition, current))
                    current = []
                if multi:
                    preposition, i = MULTIWORD[multi], i + len(multi)
                    continue
                if word in SCENE_PREPOSITIONS or word in OBJECT_PREPOSITIONS:
                    preposition = word
            elif word in POSSESSIVES and not current and preposition in SCENE_PREPOSITIONS:
                preposition = PART_OF  # "in his hand": a thing, not a place
            elif word not in DETERMINERS:
                current.append(word)
            i += 1
        if current:
            out.append((preposition, current))
        return out

    # 2. chunks -> foreground / background / alt
    def extract_one(self, caption: str) -> Extraction:
        phrases: list[tuple[str, str]] = []  # (kind: place | near | thing, phrase) in caption order
        for preposition, words in self.chunks(caption):
            while words and _is_participle(words[-1]):  # "a car parked" -> "car"
                words = words[:-1]
            phrase = " ".join(words).replace(" 's", "'s")
            if not phrase or all(w in RELATIONAL for w in words):  # "in the background" names no place
                continue
            kind = "place" if preposition in PLACE_PREPOSITIONS else "near" if preposition in NEAR_PREPOSITIONS else "thing"
            phrases.append((kind, phrase))
        # captions go from the specific to the general ("on a bed in a bedroom"): the last place is the
        # predominant background, earlier ones are things in it; a "near" phrase is the place only without one
        places = [p for kind, p in phrases if kind == "place"] or [p for kind, p in phrases if kind == "near"]
        background = places[-1] if places else ""
        foreground = list(dict.fromkeys(p for _, p in phrases if p != background))
        return Extraction(foreground=foreground, background=background, alt=self.alternative(background))

    def alternative(self, background: str) -> str:
        """The contrast table's alternative for the first word of ``background`` it knows ("*" otherwise)."""
        if not background:
            return ""
        words = background.split()
        for word in words:
            for head, alt in self.alternatives:
                if head == word or porter_stemmer().stem(head) == porter_stemmer().stem(word):
                    return alt
        return next((alt for head, alt in self.alternatives if head == "*"), "")

    def extract(self, items: list[ExtractItem]) -> BatchResult:
        return BatchResult(extractions={item.id: self.extract_one(item.caption) for item in items})
