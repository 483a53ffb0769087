"""TAS's spatial rectifier, crop box and parse gate, checked against the official code (suoych/TAS).

`official_rectifier` below is a plain transcription of tas_main.py lines 607-679 (the superlative branch)
written for this test; nemo_hf's `spatial_rectify` (default rule) must pick what it picks.
"""

import numpy as np
import pytest
import torch

from nemo_hf.zeroshot.crops import crop_box, masked_crop
from nemo_hf.zeroshot.gate import TasParse, tas_parse
from nemo_hf.zeroshot.scoring import spatial_rectify, tas_relation_rectify, tas_weights


def _official_parts(normalised_scores, centroids):
    """tas_main.py lines 609-633 as written there: (index, w1, i1, w2, i2, w3, i3, w4, i4)."""
    # line 607's output -> lines 609, 611: softmax over the proposals in float32, its first argmax. TAS runs
    # it on CUDA, whose softmax computes exp(x - max) / sum per element (PyTorch's SoftMaxForwardEpilogue);
    # written out here because torch's CPU kernel for dim 0 rounds differently (it merges near-ties CUDA keeps).
    logits = torch.tensor(np.asarray(normalised_scores, dtype=np.float32)).reshape(-1, 1)
    shifted = torch.exp(logits - logits.max())
    similarity = shifted / shifted.sum(0)
    index = int(torch.argmax(similarity))
    # lines 521-523, 529, 532: integer centroids (row, column)
    all_mass_list = np.stack([np.array([int(r), int(c)]) for r, c in centroids])
    # lines 614-621
    x_coords, y_coords = all_mass_list[:, 0], all_mass_list[:, 1]
    median_x, median_y = np.median(x_coords), np.median(y_coords)
    part1_idx = np.where((all_mass_list[:, 0] < median_x) & (all_mass_list[:, 1] < median_y))[0]
    part2_idx = np.where((all_mass_list[:, 0] >= median_x) & (all_mass_list[:, 1] < median_y))[0]
    part3_idx = np.where((all_mass_list[:, 0] < median_x) & (all_mass_list[:, 1] >= median_y))[0]
    part4_idx = np.where((all_mass_list[:, 0] >= median_x) & (all_mass_list[:, 1] >= median_y))[0]
    # lines 623-633: each part's first maximum; an empty part weighs 0 and stands for the global argmax
    weights = similarity.squeeze(1).numpy()

    def part(idx):
        if len(idx) == 0:
            return 0, index
        return max([(weights[i], i) for i in idx], key=lambda x: x[0])

    (w1, i1), (w2, i2), (w3, i3), (w4, i4) = part(part1_idx), part(part2_idx), part(part3_idx), part(part4_idx)
    return index, w1, i1, w2, i2, w3, i3, w4, i4


def official_rectifier(normalised_scores, centroids, sentence):
    """tas_main.py lines 609-679 (superlative branch) as written there (``sent[0].lower()`` is ``s``)."""
    index, w1, i1, w2, i2, w3, i3, w4, i4 = _official_parts(normalised_scores, centroids)
    s = sentence.lower()
    # lines 647-679
    if "above" in s or "top" in s or "north" in s:
        if "left" in s or "west" in s or "leftmost" in s or "western" in s:
            index = i1
        elif "right" in s or "east" in s or "eastern" in s or "rightmost" in s:
            index = i3
        else:
            index = i1 if w1 > w3 else i3
    elif "below" in s or "south" in s or "underneath" in s:
        if "left" in s or "west" in s:
            index = i2
        elif "right" in s or "east" in s:
            index = i4
        else:
            index = i2 if w2 > w4 else i4
    elif "left" in s or "west" in s or "leftmost" in s or "western" in s:
        index = i1 if w1 > w2 else i2
    elif "right" in s or "east" in s or "eastern" in s or "rightmost" in s:
        index = i3 if w3 > w4 else i4
    return int(index)


def official_relation_branch(normalised_scores, centroids, sentence, relations, head):
    """tas_main.py lines 681-746 as written there; a relation is (its words, the other entity's head text),
    the keyword lists those of heuristics.py lines 17-20 (tas_main.py lines 475-478)."""
    index, w1, i1, w2, i2, w3, i3, w4, i4 = _official_parts(normalised_scores, centroids)
    s = sentence.lower()
    left_words, right_words = ["left", "west"], ["right", "east"]
    up_words, bottom_words = ["above", "north", "top"], ["below", "south", "under"]
    for words, other in relations:
        if len(words) == 0:
            continue
        for word in words:
            if word in left_words:
                if other == head or word in other:
                    if "above" in s or "top" in s or "north" in s:
                        index = i1
                    elif "below" in s or "south" in s or "under" in s:
                        index = i2
                    else:
                        index = i1 if w1 > w2 else i2
                break
            elif word in right_words:
                if other == head or word in other:
                    if "above" in s or "top" in s or "north" in s:
                        index = i3
                    elif "below" in s or "south" in s or "under" in s:
                        index = i4
                    else:
                        index = i3 if w3 > w4 else i4
                break
            elif word in up_words:
                if other == head or word in other:
                    if "left" in s or "west" in s:
                        index = i1
                    elif "right" in s or "east" in s:
                        index = i3
                    else:
                        index = i1 if w1 > w3 else i3
                break
            elif word in bottom_words:
                if other == head or word in other:
                    if "left" in s or "west" in s:
                        index = i2
                    elif "right" in s or "east" in s:
                        index = i4
                    else:
                        index = i2 if w2 > w4 else i4
                break
    return int(index)


# Spatial words, words that hold one as a substring, words that look spatial to a person but not to TAS.
WORDS = (
    "left west leftmost western right rightmost east eastern above north top below south underneath "
    "bright laptop least beast stop upright northern topping lefty bottom under upper lower far middle "
    "man the red dog on of with a person in shirt car"
).split()


def _random_case(rng):
    n = int(rng.integers(1, 10))
    kind = rng.integers(4)
    if kind == 0:  # many exact ties
        scores = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n)
    elif kind == 1:  # every proposal the same (tas_scores gives zeros)
        scores = np.zeros(n)
    elif kind == 2:  # min-max normalised continuous scores
        scores = rng.random(n)
        scores = (scores - scores.min()) / (np.ptp(scores) or 1.0)
    else:  # near-ties: 1e-9 is the same float32 as 0.3 (a tie), 1e-5 a few hundred ulps apart. Scores a few
        # ulps apart may tie or not after the softmax depending on the kernel's summation order: not tested.
        scores = 0.3 + rng.choice([0.0, 1e-9, 1e-5, 1e-3], n)
    # centroids on a coarse grid (equal medians, proposals on the median line), with fractions (int() truncates)
    centroids = rng.integers(0, 5, (n, 2)) + rng.choice([0.0, 0.2, 0.5, 0.99], (n, 2))
    sentence = " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))
    if rng.random() < 0.3:
        sentence = sentence.upper()  # TAS lower-cases the sentence
    return scores.astype(np.float32).astype(np.float64), centroids, sentence


def test_default_rule_picks_what_tas_picks_on_seeded_random_cases():
    rng = np.random.default_rng(20)
    cases = [_random_case(rng) for _ in range(5000)]
    mismatches = [
        (scores, centroids, sentence)
        for scores, centroids, sentence in cases
        if spatial_rectify(scores, centroids, sentence) != official_rectifier(scores, centroids, sentence)
    ]
    assert not mismatches, mismatches[:3]
    # the cases exercise what differs from the whole-word rule
    differ = sum(spatial_rectify(s, c, t) != spatial_rectify(s, c, t, rule="words") for s, c, t in cases)
    assert differ > 250


LINK_WORDS = "on of in at left right west east above top north below south under underneath leftmost".split()
OTHERS = ["the left", "the car", "left", "man", "the top right", "the bottom", "far right", "the man"]


def test_relation_branch_picks_what_tas_picks_on_seeded_random_cases():
    rng = np.random.default_rng(21)
    for _ in range(3000):
        scores, centroids, sentence = _random_case(rng)
        head = str(rng.choice(["man", "the man"]))
        relations = [
            (tuple(str(w) for w in rng.choice(LINK_WORDS, int(rng.integers(0, 4)))), str(rng.choice(OTHERS + [head])))
            for _ in range(int(rng.integers(1, 4)))
        ]
        expected = official_relation_branch(scores, centroids, sentence, relations, head)
        assert tas_relation_rectify(scores, centroids, sentence, relations, head) == expected, (sentence, relations)


def test_relation_branch_by_hand():
    # "man on the left": the link "on left" to "the left", which holds "left": the better of parts 1 and 2
    assert tas_relation_rectify(SCORES, CENTROIDS, "man on the left", [(("on", "left"), "the left")], "man") == 0
    # the link's side word must be in the other entity (or the other entity be the head itself)
    assert tas_relation_rectify(SCORES, CENTROIDS, "man left of car", [(("left", "of"), "car")], "man") == 4
    # a sentence's "under" counts here (not in the superlative branch): part 2
    assert tas_relation_rectify(SCORES, CENTROIDS, "dog under the left", [(("under", "left"), "the left")], "dog") == 4
    assert tas_relation_rectify(SCORES, CENTROIDS, "dog under, on the left", [(("on", "left"), "the left")], "dog") == 2
    # later relations override earlier ones; a link with no words is skipped
    links = [(("on", "left"), "the left"), ((), "the"), (("on", "right"), "the right")]
    assert tas_relation_rectify(SCORES, CENTROIDS, "x", links, "man") == 4


def test_words_given_as_tokens_are_read_as_the_sentence():
    scores, centroids = np.array([0.1, 0.9, 0.5, 0.2]), np.array([[1.0, 1.0], [1.0, 9.0], [9.0, 1.0], [9.0, 9.0]])
    for tokens in (["the", "bright", "dog"], ["man", "on", "top"], ["below", "the", "car"]):
        assert spatial_rectify(scores, centroids, tokens) == spatial_rectify(scores, centroids, " ".join(tokens))


# Hand-computed picks. Four proposals, one per quadrant around the median centroid (5, 5), and a strong
# fifth in the middle, which is bottom-right (row >= 5, column >= 5). Parts (tas_main.py lines 618-621):
# 1 top-left {0}, 2 bottom-left {2}, 3 top-right {1}, 4 bottom-right {3, 4}.
CENTROIDS = np.array([[1.0, 1.0], [1.0, 9.0], [9.0, 1.0], [9.0, 9.0], [5.0, 5.0]])
SCORES = np.array([0.2, 0.4, 0.1, 0.3, 1.0])


@pytest.mark.parametrize(
    "sentence, tas, words",
    [
        ("man", 4, 4),
        ("left", 0, 0),  # part 1 (0.2) vs part 2 (0.1)
        ("right", 4, 4),  # part 3 (0.4) vs part 4 (1.0)
        ("top", 1, 1),  # part 1 (0.2) vs part 3 (0.4)
        ("below", 4, 4),  # part 2 (0.1) vs part 4 (1.0)
        ("below left", 2, 2),
        ("left and right", 0, 4),  # TAS: left is tested first; words: the sides cancel
        ("top guy below left", 0, 0),  # TAS: top first, then left -> part 1; words: vertical cancels, left
        ("bright dog", 4, 4),  # "bright" holds "right": parts 3 vs 4; words: no side, argmax
        ("the laptop", 1, 4),  # "laptop" holds "top": part 1 vs 3
        ("bright laptop", 1, 4),  # top + right -> part 3
        ("the least dog", 4, 4),  # "least" holds "east"
        ("bottom left", 0, 0),  # "bottom" is no word of TAS's: left alone
        ("UNDERNEATH the Western", 2, 2),
    ],
)
def test_hand_computed_picks(sentence, tas, words):
    assert spatial_rectify(SCORES, CENTROIDS, sentence) == tas
    assert spatial_rectify(SCORES, CENTROIDS, sentence, rule="words") == words
    assert official_rectifier(SCORES, CENTROIDS, sentence) == tas


def test_ties_empty_parts_integer_centroids_and_float32():
    quad = CENTROIDS[:4]
    tied = np.full(4, 0.5)
    # a tie between two parts goes to the second (strict ">", tas_main.py lines 653, 663, 669, 674)
    assert spatial_rectify(tied, quad, "left") == 2  # part 2 (bottom-left)
    assert spatial_rectify(tied, quad, "right") == 3  # part 4
    assert spatial_rectify(tied, quad, "top") == 1  # part 3
    assert spatial_rectify(tied, quad, "right", rule="words") == 1  # words: the lower index
    # two proposals on one row: no top part; an empty part weighs 0 and stands for the global argmax
    two = np.array([[5.0, 1.0], [5.0, 9.0]])
    assert spatial_rectify(np.array([0.2, 0.9]), two, "top") == 1  # parts 1 and 3 empty: the argmax
    assert spatial_rectify(np.array([0.9, 0.2]), two, "top left") == 0  # part 1 empty: the argmax
    assert spatial_rectify(np.array([0.2, 0.9]), two, "left") == 0  # part 1 empty weighs 0 < part 2
    # centroids truncated (int(np.mean), tas_main.py lines 522-523): rows 4.9, 4.2, 6.0 -> 4, 4, 6, median 4,
    # so nothing is top; as floats the median is 4.9 and proposal 1 (4.2) is top
    rows = np.array([[4.9, 1.0], [4.2, 1.0], [6.0, 1.0]])
    assert spatial_rectify(np.array([0.0, 0.5, 1.0]), rows, "top") == 2
    assert spatial_rectify(np.array([0.0, 0.5, 1.0]), rows, "top", rule="words") == 1
    # weights are float32 (line 609): 0.3 + 1e-10 and 0.3 tie, and the tie goes to part 2
    near = np.array([0.3 + 1e-10, 0.0, 0.3, 0.0])
    assert tas_weights(near)[0] == tas_weights(near)[2]
    assert spatial_rectify(near, quad, "left") == 2
    assert spatial_rectify(near, quad, "left", rule="words") == 0
    # inside a part the first maximum wins (Python's max, line 630)
    assert spatial_rectify(np.array([0.2, 0.2, 0.9]), np.array([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]), "top") == 0


# --- crops -----------------------------------------------------------------------------------


def test_tas_crop_box_is_sams_xywh_box():
    """tas_main.py lines 88-90 cut ``masked[y : y + h, x : x + w]`` with SAM's box, whose w = max_x - min_x
    and h = max_y - min_y: the mask's last row and column fall outside the crop."""
    image = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3) + 1
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:6, 3:9] = True  # rows 2..5, columns 3..8: SAM box x=3, y=2, w=5, h=3
    mask[6, 4] = True  # one pixel lower: h = 4
    assert crop_box(mask) == (2, 6, 3, 8)  # rows 2..5, columns 3..7
    assert crop_box(mask, "extent") == (2, 7, 3, 9)
    crop = masked_crop(image, mask)
    # 4 x 5 cut, padded by (5 - 4) // 2 = 0 rows: 4 x 5; row 6 and column 8 are left out
    assert crop.shape == (4, 5, 3)
    np.testing.assert_array_equal(crop, image[2:6, 3:8])
    assert masked_crop(image, mask, box="extent").shape == (5, 6, 3)
    # a mask one pixel thin has an empty TAS box: the extent is cut instead
    line = np.zeros((8, 10), dtype=bool)
    line[3, 2:7] = True
    assert crop_box(line) == crop_box(line, "extent") == (3, 4, 2, 7)
    with pytest.raises(ValueError, match="crop box 'sam'"):
        crop_box(mask, "sam")


# --- the parse gate --------------------------------------------------------------------------


class _Token:
    def __init__(self, doc, i, text, head):
        self.doc, self.i, self.text, self._head = doc, i, text, head

    @property
    def head(self):
        return self.doc[self._head]

    @property
    def children(self):
        return [t for t in self.doc if t._head == self.i and t.i != self.i]

    def is_ancestor(self, other):
        while other.head.i != other.i:
            other = other.head
            if other.i == self.i:
                return True
        return False


class _Span:
    def __init__(self, doc, start, end):
        self.doc, self.start, self.end = doc, start, end
        self.text = " ".join(t.text for t in doc.tokens[start:end])

    @property
    def root(self):
        inside = self.doc.tokens[self.start : self.end]
        return next(t for t in inside if not self.start <= t.head.i < self.end or t.head.i == t.i)


class _Doc:
    """A parse with spaCy's interface, built by hand: words, each word's head index, noun chunks."""

    def __init__(self, words, heads, chunks):
        self.tokens = [_Token(self, i, w, h) for i, (w, h) in enumerate(zip(words, heads))]
        self.text = " ".join(words)
        self.noun_chunks = [_Span(self, s, e) for s, e in chunks]

    def __iter__(self):
        return iter(self.tokens)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, key):
        return _Span(self, key.start, key.stop) if isinstance(key, slice) else self.tokens[key]


@pytest.mark.parametrize(
    "words, heads, chunks, parse",
    [
        # "on" and "left" hang below the head, "left" is a relation keyword: a superlative, no relation
        (["man", "on", "left"], [0, 0, 1], [(0, 1), (2, 3)], TasParse("superlative", (), "man")),
        # "the" is another chunk token (TAS's expanded chunks are compared by identity): a relation
        (["man", "on", "the", "left"], [0, 0, 3, 1], [(0, 1), (2, 4)],
         TasParse("relation", ((("on", "left"), "the left"),), "man")),
        (["left", "man"], [1, 1], [(0, 2)], TasParse("superlative", (), "left man")),
        (["the", "left", "man"], [2, 2, 2], [(0, 3)], TasParse("none")),  # "the": a relation; "left": a superlative
        # "leftmost" is a superlative keyword but no relation keyword: it counts as another entity
        (["leftmost", "man"], [1, 1], [(0, 2)], TasParse("relation", (((), "leftmost man"),), "leftmost man")),
        (["man"], [0], [(0, 1)], TasParse("none")),  # no superlative, no relation
        (["red", "car"], [1, 1], [(0, 2)], TasParse("relation", (((), "red car"),), "red car")),
    ],
)  # fmt: skip
def test_tas_parse_on_hand_built_parses(words, heads, chunks, parse):
    """ReCLIP's entity extraction as TAS runs it (tas_main.py lines 384-400, 637-646, 681; entity_extraction.py),
    worked by hand for each parse."""
    assert tas_parse(_Doc(words, heads, chunks)) == parse


def test_tas_parse_on_real_spacy_docs():
    """The same parses as real spaCy Docs (built by hand: no model needed), where spaCy is installed."""
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc

    vocab = spacy.blank("en").vocab
    man_on_left = Doc(vocab, words=["man", "on", "left"], heads=[0, 0, 1], deps=["ROOT", "prep", "pobj"],
                      pos=["NOUN", "ADP", "NOUN"])  # fmt: skip
    the_left = Doc(vocab, words=["man", "on", "the", "left"], heads=[0, 0, 3, 1],
                   deps=["ROOT", "prep", "det", "pobj"], pos=["NOUN", "ADP", "DET", "NOUN"])  # fmt: skip
    leftmost = Doc(vocab, words=["leftmost", "man"], heads=[1, 1], deps=["amod", "ROOT"], pos=["ADJ", "NOUN"])
    assert [c.text for c in man_on_left.noun_chunks] == ["man", "left"]
    assert tas_parse(man_on_left) == TasParse("superlative", (), "man")
    assert tas_parse(the_left) == TasParse("relation", ((("on", "left"), "the left"),), "man")
    assert tas_parse(leftmost).branch == "relation"


# --- the predictor: rule, parse and provenance -----------------------------------------------


class _Parses:
    """A stand-in for `gate.SpacyParseGate` (no spaCy model can be installed here): a fixed parse per sentence."""

    name = "test parses"

    def __init__(self, parses):
        self.parses, self.seen = parses, []

    def __call__(self, sentence):
        self.seen.append(sentence)
        return self.parses[sentence]


def _features():
    """Four proposals, one per quadrant (TL, TR, BL, BR) around the median (5, 5), scoring 0.2 0.4 0.1 0.3
    after min-max (raw cosines 0.3 0.5 0.2 0.4 against the text (1, 0))."""
    from nemo_hf.masks import encode_rle
    from nemo_hf.zeroshot.encode import ImageFeatures

    cosines = np.array([0.3, 0.5, 0.2, 0.4])
    crop_emb = np.stack([cosines, np.sqrt(1 - cosines**2)], axis=1)
    mask = encode_rle(np.ones((10, 10), np.uint8))
    return ImageFeatures((10, 10), [mask] * 4, crop_emb, CENTROIDS[:4], np.array([1.0, 0.0])), np.array([1.0, 0.0])


def test_predictor_follows_the_rule_and_the_parse():
    from types import SimpleNamespace

    from nemo_hf.zeroshot.predict import WORDS_ONLY_GATE, TasPredictor
    from nemo_hf.zeroshot.proposals import InstanceProposals

    features, text = _features()
    encoder = SimpleNamespace(embedder=SimpleNamespace(identity=SimpleNamespace(as_dict=dict)), cache_key=dict)
    tas = TasPredictor(encoder, InstanceProposals())
    words = TasPredictor(encoder, InstanceProposals(), rectifier="words")
    # scores (0.333, 1, 0, 0.667): argmax 1 (TR)
    assert tas.choose(features, "the bright dog", ["the", "bright", "dog"], text) == 1  # TR 1.0 vs BR 0.667
    assert tas.choose(features, "left and right", ["left", "and", "right"], text) == 0  # TAS: left first
    assert words.choose(features, "left and right", ["left", "and", "right"], text) == 1  # words: cancel
    parses = _Parses({
        "the man": TasParse("none"),
        "the left man": TasParse("none"),  # "the" and "left": a relation and a superlative
        "man on left": TasParse("superlative", (), "man"),
        "man on the left": TasParse("relation", ((("on", "left"), "the left"),), "man"),
        "man left of the car": TasParse("relation", ((("left", "of"), "the car"),), "man"),
    })  # fmt: skip
    gated = TasPredictor(encoder, InstanceProposals(), gate=parses)
    assert gated.choose(features, "the left man", [], text) == 1  # no branch: the argmax
    assert gated.choose(features, "man on left", [], text) == 0  # superlative: TL 0.333 vs BL 0
    assert gated.choose(features, "man on the left", [], text) == 0  # relation branch
    assert gated.choose(features, "man left of the car", [], text) == 1  # "left" is not in "the car": argmax
    assert parses.seen == ["the left man", "man on left", "man on the left", "man left of the car"]
    gated_words = TasPredictor(encoder, InstanceProposals(), rectifier="words", gate=parses)
    assert gated_words.choose(features, "the left man", ["the", "left", "man"], text) == 1
    assert gated_words.choose(features, "man on the left", ["man", "on", "the", "left"], text) == 0

    assert tas.describe()["rectifier_gate"] == WORDS_ONLY_GATE and "words only" in WORDS_ONLY_GATE
    assert gated.describe()["rectifier_gate"] == "test parses"
    assert (words.describe()["spatial_rectifier"], tas.describe()["crop_box"]) == ("words", "tas")
    extent = TasPredictor(encoder, InstanceProposals(), crop_box="extent")
    assert extent.cache_key()["crop_box"] == "extent" != tas.cache_key()["crop_box"]  # crops differ: so does the cache
    with pytest.raises(ValueError, match="rectifier 'nearest'"):
        TasPredictor(None, InstanceProposals(), rectifier="nearest")
    with pytest.raises(ValueError, match="crop box 'sam'"):
        TasPredictor(None, InstanceProposals(), crop_box="sam")
