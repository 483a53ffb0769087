"""When and how TAS runs its spatial rectifier: what its spaCy parse finds (suoych/TAS tas_main.py lines
637-746). With the head noun phrase, a superlative and no relation: the superlative branch (the rectifier
proper); with relations and no superlative: the relation branch; otherwise the plain argmax.

TAS parses the lower-cased sentence with ReCLIP's entity extraction (``parse_sentence_entities``,
tas_main.py lines 384-400; ``entity_extraction.py``, ``heuristics.py``) and opens the gate when

- the entity's head chunk reads the same as the sentence's head noun phrase (``extract_noun_phrase``,
  tas_main.py lines 195-234), and
- the entity has superlatives and no relation (superlative branch), or relations and no superlative
  (relation branch).

Two details of the release decide what that means and are kept:

- TAS always expands the noun chunks (``if expand_chunks:`` at tas_main.py line 390 tests the imported
  function, which is always true), and the expansion makes one new Span per token
  (entity_extraction.py line 39). The extraction compares chunks by identity (lines 76, 91), so every
  other token of the head's own chunk ("the" in "the left man") counts as another entity: a relation
  (with no linking word, which the relation branch skips). "man on the left" is a relation ("on left"
  to "the left"), "man on left" a superlative.
- Keywords match whole token texts (``tok.text in keywords``), unlike the rectifier's substring tests.

Works on any parse with spaCy's Doc/Token/Span interface; no spaCy import here.
"""

from __future__ import annotations

from typing import NamedTuple

# ReCLIP's heuristics.py as TAS ships it: RELATIONS (lines 16-24), SUPERLATIVES (30-37), NULL_KEYWORDS (40).
RELATION_KEYWORDS = frozenset(
    "left west right east above north top below south under bigger larger closer smaller tinier further "
    "inside within contained".split()
)
SUPERLATIVE_KEYWORDS = frozenset(
    "left west leftmost western right rightmost east eastern above north top below south underneath bigger "
    "biggest larger largest closer closest smaller smallest tinier tiniest further furthest".split()
)
NULL_KEYWORDS = frozenset("part image side picture half region section".split())


def _chunk_of_token(doc) -> dict[int, tuple[int, int]]:
    """token index -> (start, end) of its spaCy noun chunk."""
    return {i: (chunk.start, chunk.end) for chunk in doc.noun_chunks for i in range(chunk.start, chunk.end)}


def _expanded(doc, chunks: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """ReCLIP's ``expand_chunks`` (entity_extraction.py lines 23-40): each token's chunk widened to the
    neighbouring tokens it governs that govern no other chunk."""
    out = {}
    for key, (start, end) in chunks.items():
        inside = range(start, end)
        others = [range(*chunks[k]) for k in chunks if k != key]
        new_start, new_end = start, end
        for i in range(start - 1, -1, -1):
            governed = any(doc[j].is_ancestor(doc[i]) for j in inside)
            if governed and not any(any(doc[i].is_ancestor(doc[j]) for j in other) for other in others):
                new_start = i
        for i in range(end, len(doc)):
            if any(doc[j].is_ancestor(doc[i]) for j in inside):
                if not any(any(doc[i].is_ancestor(doc[j]) or i == j for j in other) for other in others):
                    new_end = i + 1
                else:
                    break
        out[key] = (new_start, new_end)
    return out


def _superlatives(tokens) -> list:
    """``find_superlatives`` (entity_extraction.py lines 15-21): the chain, when one of its words is a keyword."""
    return [sorted(tokens, key=lambda t: t.i)] if any(t.text in SUPERLATIVE_KEYWORDS for t in tokens) else []


def _extract(head, chunks):
    """``Entity.extract`` (entity_extraction.py lines 50-67): (head chunk key, relations, superlatives) or None."""
    if head.i not in chunks:  # predicative: the first child, when it is in a chunk
        children = list(head.children)
        if not (children and children[0].i in chunks):
            return None
        head = children[0]
    relations, superlatives = _relations_superlatives(head, head, [], chunks)
    return head.i, relations, superlatives


def _relations_superlatives(token, head, tokens, chunks):
    """``Entity._get_rel_sups`` (entity_extraction.py lines 70-102). Chunk identity is token identity
    (one expanded Span per token), so the branch at line 91 never applies."""
    keyword = token.text in RELATION_KEYWORDS or token.text in NULL_KEYWORDS
    if token.i in chunks and token.i != head.i and not keyword:  # another entity
        return [(tokens, _extract(token, chunks))], []
    children = list(token.children)
    if not children:
        return [], _superlatives(tokens + [token])
    keyword = keyword or token.text in SUPERLATIVE_KEYWORDS
    relations, superlatives = [], []
    for child in children:
        chain = tokens + [token] if token.i not in chunks or keyword else tokens
        sub_relations, sub_superlatives = _relations_superlatives(child, head, chain, chunks)
        relations += sub_relations
        superlatives += sub_superlatives
    return relations, superlatives


def _head_noun_phrase(doc) -> str:
    """``extract_noun_phrase`` (tas_main.py lines 195-234): the plain noun chunk of the last root (or of its
    first child), else the whole text."""
    chunks = _chunk_of_token(doc)
    head = [t for t in doc if t.head.i == t.i][-1]
    if head.i not in chunks:
        children = list(head.children)
        if not (children and children[0].i in chunks):
            return doc.text
        head = children[0]
    return doc[slice(*chunks[head.i])].text


class TasParse(NamedTuple):
    """What TAS's parse decides for one sentence: ``branch`` is ``"superlative"`` (`scoring.tas_rectify`),
    ``"relation"`` (`scoring.tas_relation_rectify`, with ``relations`` as (linking words, the other entity's
    head chunk) and ``head``) or ``"none"`` (the plain argmax)."""

    branch: str
    relations: tuple[tuple[tuple[str, ...], str], ...] = ()
    head: str = ""


def tas_parse(doc) -> TasParse:
    """TAS's parse of the lower-cased sentence and the branch it takes (tas_main.py lines 637-648, 681)."""
    chunks = _expanded(doc, _chunk_of_token(doc))
    root = next((t for t in doc if t.head.i == t.i), None)
    entity = None if root is None else _extract(root, chunks)
    noun_chunks = list(doc.noun_chunks)
    if entity is None and noun_chunks:  # no head noun: the first chunk's (tas_main.py lines 394-398)
        entity = _extract(noun_chunks[0].root.head, chunks)
    if entity is None:
        return TasParse("none")
    key, relations, superlatives = entity
    head = doc[slice(*chunks[key])].text
    if head != _head_noun_phrase(doc):
        return TasParse("none")
    if superlatives and not relations:
        return TasParse("superlative", head=head)
    if relations and not superlatives:
        links = tuple(
            (tuple(t.text for t in sorted(words, key=lambda t: t.i)), doc[slice(*chunks[other[0]])].text)
            for words, other in relations
        )
        return TasParse("relation", links, head)
    return TasParse("none")


class SpacyParseGate:
    """TAS's parse with a spaCy pipeline (``--phrases spacy``): parses ``sentence.lower()`` as TAS does and
    says which of TAS's branches rectifies it (`TasParse`)."""

    name = "spacy parse: TAS's superlative branch (head noun phrase, a superlative, no relation) and relation branch"

    def __init__(self, nlp):
        self.nlp = nlp

    def __repr__(self) -> str:
        return "SpacyParseGate()"

    def __call__(self, sentence: str) -> TasParse:
        return tas_parse(self.nlp(sentence.lower()))
