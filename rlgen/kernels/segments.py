"""Segment operations: the two primitives the log-prob functions are built from, per backend.

`stats` folds a segment of each logit row (the whole vocabulary, or one vocabulary chunk starting at
`col_offset`) into a running per-row state (m, s, t, tz): the online softmax of the tempered logits
z = x / T, where m is the running max, s = sum exp(z - m), t = sum exp(z - m) (z - m) and tz is the
target's z. `grad` writes d(loss)/d(x) of a segment from the finished log-normaliser and entropy,
possibly into x itself. See native/cpu/kernels.h for the formulas.

Backends: the compiled CPU kernels (rlgen._native), the CUDA kernels (rlgen._native_cuda), and the
same algorithm in torch operations (used when the extension is not built).
"""
from __future__ import annotations

import torch

EXP_FLOOR = -87.0  # exp below this counts as 0 (matches the kernels; also what -inf logits give)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_state(rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    state = torch.zeros(4, rows, dtype=accumulation_dtype(dtype), device=device)
    state[0].fill_(float("-inf"))
    return state


def finish(state: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """(logprobs, entropy, logz) of each row from its finished state."""
    m, s, t, tz = state
    log_s = torch.log(s)
    logz = m + log_s
    entropy = log_s - t / s
    logprobs = torch.where(targets == ignore_index, torch.zeros_like(tz), tz - logz)
    return logprobs, entropy, logz


def bad_target_error(targets: torch.Tensor, ignore_index: int, vocab: int) -> ValueError:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    value = int(targets[bad][0]) if bool(bad.any()) else "?"
    return ValueError(f"target {value} is outside the vocabulary [0, {vocab})")


class Segments:
    """What every backend shares: whole-row forward as one stats pass plus finish."""

    name = "?"

    def forward(self, x, targets, ignore_index, inv_t):
        state = new_state(targets.numel(), x.dtype, x.device)
        if targets.numel():
            self.stats(x, targets, ignore_index, x.shape[-1], 0, inv_t, state)
        return finish(state, targets, ignore_index)

    def describe(self) -> str:
        return self.name


class NativeCPU(Segments):
    name = "native-cpu"

    def __init__(self, module):
        self.module = module

    def threads(self) -> int:
        return torch.get_num_threads()

    def forward(self, x, targets, ignore_index, inv_t):
        rows, acc = targets.numel(), accumulation_dtype(x.dtype)
        logprobs, entropy, logz = (torch.empty(rows, dtype=acc) for _ in range(3))
        if rows and self.module.logprob_forward(x, targets, ignore_index, inv_t, logprobs, entropy, logz, self.threads()):
            raise bad_target_error(targets, ignore_index, x.shape[-1])
        return logprobs, entropy, logz

    def stats(self, x, targets, ignore_index, vocab, col_offset, inv_t, state):
        if self.module.softmax_stats(x, targets, ignore_index, vocab, col_offset, inv_t, state, self.threads()):
            raise bad_target_error(targets, ignore_index, vocab)

    def grad(self, x, out, targets, ignore_index, col_offset, inv_t, logz, entropy, grad_logprob, grad_entropy):
        self.module.softmax_grad(x, out, targets, ignore_index, col_offset, inv_t, logz, entropy, grad_logprob,
                                 grad_entropy, self.threads())

    def describe(self) -> str:
        threads = f"OpenMP, {self.threads()} threads" if self.module.openmp else "1 thread"
        return f"{self.name} ({self.module.active_isa()}, {threads})"


class NativeCUDA(Segments):
    """CUDA kernels on torch's current stream. Targets are range-checked by an asynchronous device assert."""

    name = "native-cuda"

    def __init__(self, module):
        self.module = module

    @staticmethod
    def _stream(x) -> int:
        return torch.cuda.current_stream(x.device).cuda_stream

    def stats(self, x, targets, ignore_index, vocab, col_offset, inv_t, state):
        if col_offset == 0:  # a device-side assert: no synchronisation
            torch._assert_async(((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all(),
                                "a target is outside the vocabulary")
        self.module.softmax_stats(x, targets, ignore_index, col_offset, inv_t, state, self._stream(x))

    def grad(self, x, out, targets, ignore_index, col_offset, inv_t, logz, entropy, grad_logprob, grad_entropy):
        self.module.softmax_grad(x, out, targets, ignore_index, col_offset, inv_t, logz, entropy, grad_logprob,
                                 grad_entropy, self._stream(x))


class TorchSegments(Segments):
    """The segment algorithm in torch operations: chunked, so still no [N, V] tensor in the fused path."""

    name = "torch"

    def stats(self, x, targets, ignore_index, vocab, col_offset, inv_t, state):
        if col_offset == 0 and targets.device.type == "cpu":
            if bool(((targets != ignore_index) & ((targets < 0) | (targets >= vocab))).any()):
                raise bad_target_error(targets, ignore_index, vocab)
        acc = state.dtype
        z = x.reshape(-1, x.shape[-1]).to(acc) * inv_t
        m, s, t, tz = state
        block_max = z.amax(-1) if z.shape[-1] else torch.full_like(m, float("-inf"))
        new_m = torch.maximum(m, block_max)
        live = new_m != float("-inf")  # NaN rows stay live, so the NaN reaches the results
        scale = torch.where(s > 0, torch.exp(m - new_m), torch.zeros_like(s))
        t_old = torch.where(s > 0, scale * (t + (m - new_m) * s), torch.zeros_like(t))
        d = (z - torch.where(live, new_m, torch.zeros_like(new_m)).unsqueeze(-1)).clamp(min=EXP_FLOOR)
        e = torch.where(d <= EXP_FLOOR, torch.zeros_like(d), torch.exp(d))
        s_new = torch.where(live, s * scale + e.sum(-1), s)
        t_new = torch.where(live, t_old + (e * d).sum(-1), t)
        local = targets - col_offset
        inside = (targets != ignore_index) & (local >= 0) & (local < z.shape[-1])
        picked = z.gather(-1, local.clamp(0, max(z.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1) if z.shape[-1] else tz
        state[3] = torch.where(inside, picked, tz)
        state[0], state[1], state[2] = torch.where(live, new_m, m), s_new, t_new

    def grad(self, x, out, targets, ignore_index, col_offset, inv_t, logz, entropy, grad_logprob, grad_entropy):
        acc = logz.dtype
        z = x.reshape(-1, x.shape[-1]).to(acc) * inv_t
        lp = (z - logz.unsqueeze(-1)).clamp(min=EXP_FLOOR)
        p = torch.where(lp <= EXP_FLOOR, torch.zeros_like(lp), torch.exp(lp))
        ignored = (targets == ignore_index) | (targets < 0)
        g_lp = torch.zeros_like(logz) if grad_logprob is None else torch.where(ignored, torch.zeros_like(logz), grad_logprob)
        g = p * (-inv_t * g_lp).unsqueeze(-1)
        if grad_entropy is not None:
            g = g - inv_t * grad_entropy.unsqueeze(-1) * p * (lp + entropy.unsqueeze(-1))
        local = targets - col_offset
        inside = (~ignored) & (local >= 0) & (local < z.shape[-1])
        if z.shape[-1]:
            g.scatter_add_(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1),
                           torch.where(inside, inv_t * g_lp, torch.zeros_like(g_lp)).unsqueeze(-1))
        out.copy_(g.view(out.shape).to(out.dtype))
