"""Splitting a causal LM into its decoder (up to the last hidden state) and its output projection, so
the trainers can feed hidden states to the fused linear log-prob kernel instead of building logits."""
from __future__ import annotations

import weakref

import torch

from rlgen.models.causal_lm import unwrap_peft

_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_head(model):
    """(decoder, lm_head) when model(...).logits == lm_head(decoder(...).last_hidden_state), else None.

    The lm_head must be a plain nn.Linear (a LoRA-wrapped head, logit soft-capping or scaling inside
    forward would break the identity). The structure is checked by name, then confirmed once per model
    by running both on a few tokens, which catches models whose forward does more than project.
    """
    base = unwrap_peft(model)
    if base in _checked:
        return _checked[base]
    split = _candidate(base)
    if split is not None and not _same_logits(base, *split):
        split = None
    _checked[base] = split
    return split


def _candidate(base):
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module) or decoder is base:
        return None
    return decoder, head


@torch.no_grad()
def _same_logits(base, decoder, head) -> bool:
    vocab = head.weight.shape[0]
    ids = (torch.arange(4, device=head.weight.device) * 7 + 1).remainder(vocab).unsqueeze(0)
    modes = {module: module.training for module in base.modules()}
    base.eval()  # dropout would make the two passes differ
    try:
        expected = base(input_ids=ids, use_cache=False).logits
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        got = head(hidden)
    except Exception:  # noqa: BLE001 - a decoder that cannot run alone: no fused path
        return False
    finally:
        for module, training in modes.items():
            module.training = training
    if got.shape != expected.shape:
        return False
    tol = 1e-4 if expected.dtype == torch.float32 else 2e-2
    scale = float(expected.float().abs().max().clamp(min=1.0))
    return bool(((got.float() - expected.float()).abs().max() <= tol * scale))
