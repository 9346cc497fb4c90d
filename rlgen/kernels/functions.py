"""Autograd functions for per-token log-probs and entropies, built on the segment operations.

TokenLogprobs: logits [..., V] -> (logprobs, entropy). Forward keeps only the per-row
log-normaliser and entropy; backward recomputes p from them and writes the logits' gradient in one
sweep, into the logits' own memory when `inplace_backward` is set (the caller promises nobody reads
the logits afterwards, as when they come straight from the model's head).

LinearTokenLogprobs: hidden [N, H], weight [V, H] -> the same, without the [N, V] logits. Forward
walks vocabulary chunks x token chunks, computing each chunk's logits with one matmul into a reused
buffer and folding it into the running state; backward recomputes each chunk's logits, turns them
into their gradient in place and accumulates grad_hidden = G W and grad_weight = G^T h.
"""
from __future__ import annotations

import torch

from rlgen.kernels.segments import finish, new_state


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D or 3-D view of x[..., V] with a contiguous last dimension, copying only when no view exists."""
    v = x.shape[-1]
    if x.dim() >= 2 and x.stride(-1) == 1 or v <= 1:
        if x.dim() == 2 or x.dim() == 3:
            return x
        try:
            return x.view(-1, v)
        except RuntimeError:
            pass
    return x.contiguous().view(-1, v)


def flat_targets(targets: torch.Tensor, rows: int) -> torch.Tensor:
    flat = targets.reshape(-1).long().contiguous()
    if flat.numel() != rows:
        raise ValueError(f"got {flat.numel()} targets for {rows} rows of logits")
    return flat


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ops, inplace_backward, ignore_index):
        shape = logits.shape[:-1]
        rows_view = as_rows(logits.detach())
        targets = flat_targets(targets, shape.numel())
        inv_t = 1.0 / temperature
        logprobs, entropy, logz = ops.forward(rows_view, targets, ignore_index, inv_t)
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.ops, ctx.inv_t, ctx.inplace, ctx.ignore_index = ops, inv_t, inplace_backward, ignore_index
        ctx.set_materialize_grads(False)
        return logprobs.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, logz, entropy = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 6
        acc = logz.dtype
        g_lp = None if grad_logprobs is None else grad_logprobs.reshape(-1).to(acc).contiguous()
        g_h = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc).contiguous()
        x = as_rows(logits.detach())
        inplace = ctx.inplace and x.data_ptr() == logits.data_ptr()
        out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        if targets.numel():
            ctx.ops.grad(x, out, targets, ctx.ignore_index, 0, ctx.inv_t, logz, entropy, g_lp, g_h)
        if inplace:
            # The logits now hold their gradient: anything else that saved them must fail loudly.
            torch.autograd.graph.increment_version(logits)
            return logits.detach(), None, None, None, None, None
        return out.view(logits.shape), None, None, None, None, None


class LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ops, ignore_index, token_chunk, vocab_chunk):
        shape = hidden.shape[:-1]
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        w = weight.detach()
        b = None if bias is None else bias.detach()
        vocab, rows = w.shape[0], h.shape[0]
        targets = flat_targets(targets, rows)
        inv_t = 1.0 / temperature
        buffer = _chunk_buffer(rows, vocab, token_chunk, vocab_chunk, h)
        if vocab <= vocab_chunk or rows == 0:  # whole rows per chunk: finish them in the same pass
            parts = [ops.forward(_chunk_logits(h[r0:r0 + token_chunk], w, b, buffer), targets[r0:r0 + token_chunk],
                                 ignore_index, inv_t) for r0 in (range(0, rows, token_chunk) if rows else [0])]
            logprobs, entropy, logz = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts))
            # One chunk holds all the logits: keep it for backward instead of recomputing it (same peak).
            ctx.kept_logits = buffer.view(rows, vocab) if rows <= token_chunk else None
        else:
            state = new_state(rows, h.dtype, h.device)
            for v0, v1, r0, r1 in _chunks(rows, vocab, token_chunk, vocab_chunk):
                chunk = _chunk_logits(h[r0:r1], w[v0:v1], None if b is None else b[v0:v1], buffer)
                ops.stats(chunk, targets[r0:r1], ignore_index, vocab, v0, inv_t, state[:, r0:r1])
            logprobs, entropy, logz = finish(state, targets, ignore_index)
            ctx.kept_logits = None
        ctx.save_for_backward(hidden, weight, bias, targets, logz, entropy)
        ctx.ops, ctx.inv_t, ctx.chunks, ctx.ignore_index = ops, inv_t, (token_chunk, vocab_chunk), ignore_index
        ctx.set_materialize_grads(False)
        return logprobs.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, logz, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nothing = (None,) * 9
        if grad_logprobs is None and grad_entropy is None or not (need_h or need_w or need_b):
            return nothing
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        w = weight.detach()
        b = None if bias is None else bias.detach()
        acc = logz.dtype
        g_lp = None if grad_logprobs is None else grad_logprobs.reshape(-1).to(acc).contiguous()
        g_h = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc).contiguous()
        rows, vocab = h.shape[0], w.shape[0]
        kept, ctx.kept_logits = ctx.kept_logits, None  # overwritten below: a second backward recomputes
        if kept is not None and rows:  # one chunk: plain matmuls, no zero-filled accumulators
            ctx.ops.grad(kept, kept, targets, ctx.ignore_index, 0, ctx.inv_t, logz, entropy, g_lp, g_h)
            grad_hidden = (kept @ w).view(hidden.shape) if need_h else None
            return (grad_hidden, kept.t() @ h if need_w else None, kept.sum(0) if need_b else None,
                    None, None, None, None, None, None)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        token_chunk, vocab_chunk = ctx.chunks
        buffer = _chunk_buffer(rows, vocab, token_chunk, vocab_chunk, h)
        for v0, v1, r0, r1 in _chunks(rows, vocab, token_chunk, vocab_chunk):
            chunk = _chunk_logits(h[r0:r1], w[v0:v1], None if b is None else b[v0:v1], buffer)
            ctx.ops.grad(chunk, chunk, targets[r0:r1], ctx.ignore_index, v0, ctx.inv_t, logz[r0:r1], entropy[r0:r1],
                         None if g_lp is None else g_lp[r0:r1], None if g_h is None else g_h[r0:r1])
            if need_h:
                grad_h[r0:r1].addmm_(chunk, w[v0:v1])
            if need_w:
                grad_w[v0:v1].addmm_(chunk.t(), h[r0:r1])
            if need_b:
                grad_b[v0:v1] += chunk.sum(0)
        grad_hidden = grad_h.view(hidden.shape) if need_h else None
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None


def _chunks(rows: int, vocab: int, token_chunk: int, vocab_chunk: int):
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        for r0 in range(0, rows, token_chunk):
            yield v0, v1, r0, min(r0 + token_chunk, rows)


def _chunk_buffer(rows, vocab, token_chunk, vocab_chunk, like):
    """One buffer reused by every chunk, so the allocator (and the OS's page faults) are paid once."""
    return torch.empty(min(rows, token_chunk) * min(vocab, vocab_chunk), dtype=like.dtype, device=like.device)


def _chunk_logits(h, w, b, buffer):
    out = buffer[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)
