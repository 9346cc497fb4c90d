"""The log-prob / entropy kernels against the eager torch reference: values, gradients (also gradcheck
in float64), edge cases (V not a multiple of the SIMD width, N = 0, masked vocabulary, temperature,
ignored targets, strided and bf16 input, in-place backward), every compiled CPU variant and the torch
fallback."""
from __future__ import annotations

import pytest
import torch

from rlgen import kernels
from rlgen.kernels import reference

NATIVE = kernels._import_native("_native")
# Every way the kernels can run on this machine: each compiled CPU variant, and the torch fallback.
BACKENDS = [f"native:{isa}" for isa in (NATIVE.available_isas() if NATIVE else [])] + ["torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    kind, _, isa = request.param.partition(":")
    previous = kernels.use("auto" if kind == "native" else "torch")
    old_isa = NATIVE.active_isa() if NATIVE else None
    if isa:
        NATIVE.set_isa(isa)
    try:
        yield request.param
    finally:
        kernels.use(previous)
        if old_isa:
            NATIVE.set_isa(old_isa)


def random_logits(n, v, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * scale).to(dtype)


def random_targets(n, v, seed=1):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


def grads(fn, logits, targets, temperature, w_lp, w_h, **kw):
    x = logits.clone().requires_grad_()
    lp, h = fn(x, targets, temperature, **kw)
    loss = (lp * w_lp).sum() + (0 if w_h is None else (h * w_h).sum())
    (g,) = torch.autograd.grad(loss, x)
    return lp.detach(), h.detach(), g


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,v", [(1, 1), (7, 5), (9, 17), (5, 2048 + 37), (3, 5000), (33, 31)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_logprobs_matches_reference(backend, n, v, temperature):
    logits, targets = random_logits(n, v), random_targets(n, v)
    w_lp = torch.linspace(-1, 2, n)
    w_h = torch.linspace(0.5, -1.5, n)
    lp, h, g = grads(kernels.token_logprobs, logits, targets, temperature, w_lp, w_h)
    lp_r, h_r, g_r = grads(reference.token_logprobs, logits, targets, temperature, w_lp, w_h)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    assert_close(lp, lp_r, 1e-5)
    assert_close(h, h_r, 1e-5)
    assert_close(g, g_r, 1e-5)


def test_gradient_without_entropy_term(backend):
    """The trainers use the entropy as a metric: only the log-prob term reaches the logits."""
    logits, targets = random_logits(6, 300), random_targets(6, 300)
    w = torch.randn(6)
    _, _, g = grads(kernels.token_logprobs, logits, targets, 0.8, w, None)
    _, _, g_r = grads(reference.token_logprobs, logits, targets, 0.8, w, None)
    assert_close(g, g_r, 1e-5)
    # hand-computed: d lp_i / d x_ij = ([j == t_i] - p_ij) / T
    p = torch.softmax(logits / 0.8, -1)
    expected = (torch.nn.functional.one_hot(targets, 300) - p) / 0.8 * w.unsqueeze(1)
    assert_close(g, expected, 1e-5)


def test_hand_computed_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, float("-inf"), 0.0]])
    targets = torch.tensor([1, 0])
    lp, h = kernels.token_logprobs(logits, targets)
    z = 2 + torch.log(1 + 2 * torch.exp(torch.tensor(-2.0)))  # log(e^2 + 1 + 1)
    p0 = torch.exp(2 - z)
    p1 = torch.exp(-z)
    assert_close(lp, torch.stack([-torch.log(torch.tensor(4.0)), 2 - z]), 1e-6)
    assert_close(h, torch.stack([torch.log(torch.tensor(4.0)), -(p0 * torch.log(p0) + 2 * p1 * torch.log(p1))]), 1e-6)


def test_masked_vocabulary(backend):
    logits, targets = random_logits(8, 100), random_targets(8, 100)
    logits[:, ::3] = float("-inf")
    targets = torch.where(targets % 3 == 0, targets + 1, targets)
    logits[0, :] = float("-inf")
    logits[0, 50] = 1.0  # one live entry: log-prob 0, entropy 0
    targets[0] = 50
    w_lp, w_h = torch.randn(8), torch.randn(8)
    lp, h, g = grads(kernels.token_logprobs, logits, targets, 0.9, w_lp, w_h)
    lp_r, h_r, g_r = grads(reference.token_logprobs, logits, targets, 0.9, w_lp, w_h)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(g).all()
    assert_close(lp, lp_r, 1e-5)
    assert_close(h, h_r, 1e-5)
    assert_close(g, g_r, 1e-5)
    assert (g[torch.isinf(logits)] == 0).all()
    assert abs(float(lp[0])) < 1e-6 and abs(float(h[0])) < 1e-6


def test_ignored_targets(backend):
    logits, targets = random_logits(5, 40), random_targets(5, 40)
    targets[2] = -100
    w_lp, w_h = torch.randn(5), torch.randn(5)
    lp, h, g = grads(kernels.token_logprobs, logits, targets, 1.0, w_lp, w_h)
    lp_r, h_r, g_r = grads(reference.token_logprobs, logits, targets, 1.0, w_lp, w_h)
    assert float(lp[2]) == 0.0
    assert_close(lp, lp_r, 1e-5)
    assert_close(g, g_r, 1e-5)
    _, _, g_lp_only = grads(kernels.token_logprobs, logits, targets, 1.0, w_lp, None)
    assert (g_lp_only[2] == 0).all()


def test_empty_batch(backend):
    logits = torch.zeros(0, 50, requires_grad=True)
    lp, h = kernels.token_logprobs(logits, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and h.shape == (0,)
    (g,) = torch.autograd.grad(lp.sum() + h.sum(), logits)
    assert g.shape == (0, 50)
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    lp, h = kernels.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
    assert lp.shape == (0,) and gh.shape == (0, 8) and (gw == 0).all()


def test_strided_batched_input_needs_no_copy(backend):
    """logits[:, :-1, :] as the trainers pass it: [B, T, V] with a gap between batch rows."""
    base = random_logits(3 * 6, 70).view(3, 6, 70)
    view = base[:, :-1, :]
    targets = torch.randint(0, 70, (3, 5))
    w = torch.randn(3, 5)
    lp, h, g = grads(kernels.token_logprobs, view, targets, 1.3, w, w.flip(0))
    lp_r, h_r, g_r = grads(reference.token_logprobs, view, targets, 1.3, w, w.flip(0))
    assert lp.shape == (3, 5)
    assert_close(lp, lp_r, 1e-5)
    assert_close(h, h_r, 1e-5)
    assert_close(g, g_r, 1e-5)


def test_inplace_backward_overwrites_logits_and_guards_reuse(backend):
    x = random_logits(4, 3, seed=3).requires_grad_()
    layer = torch.nn.Linear(3, 90)
    targets = random_targets(4, 90)
    expected = torch.autograd.grad(reference.token_logprobs(layer(x), targets)[0].sum(), (x, layer.weight))

    logits = layer(x)  # a fresh intermediate, as from an lm_head
    lp, _ = kernels.token_logprobs(logits, targets, inplace_backward=True)
    got = torch.autograd.grad(lp.sum(), (x, layer.weight))
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-5)
    p = torch.softmax(layer(x).detach(), -1)
    assert_close(logits.detach(), torch.nn.functional.one_hot(targets, 90) - p, 1e-5)  # the logits now hold d lp / d logits

    # A second reader of the same logits must fail loudly, not read the gradient.
    logits = layer(x)
    lp1, _ = kernels.token_logprobs(logits, targets, inplace_backward=True)
    lp2, _ = kernels.token_logprobs(logits, targets.flip(0), inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (lp1.sum() + lp2.sum()).backward()


def test_out_of_place_backward_leaves_logits_alone(backend):
    logits = random_logits(4, 64).requires_grad_()
    before = logits.detach().clone()
    lp, _ = kernels.token_logprobs(logits, random_targets(4, 64))
    lp.sum().backward()
    assert torch.equal(logits.detach(), before)


def test_bf16_input(backend):
    logits, targets = random_logits(6, 1000, torch.bfloat16), random_targets(6, 1000)
    w = torch.randn(6)
    lp, h, g = grads(kernels.token_logprobs, logits, targets, 0.7, w, w)
    lp_r, h_r, g_r = grads(reference.token_logprobs, logits, targets, 0.7, w, w)
    assert lp.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert_close(lp, lp_r, 1e-5)  # same bf16 values, fp32 arithmetic on both sides
    assert_close(h, h_r, 1e-5)
    assert_close(g.float(), g_r.float(), 1e-2)


def test_float64_gradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 9, (4,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: kernels.token_logprobs(x, t, 0.8), (x,))
    h = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(11, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 11, (5,), generator=gen)
    fn = lambda h, w, b: kernels.linear_token_logprobs(h, w, t, 1.3, bias=b, token_chunk=2, vocab_chunk=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


# one-token chunks loop in Python for every token (seconds): the fast tier keeps the (7, 13) chunking
@pytest.mark.parametrize("chunks", [(1024, 4096), (7, 13), pytest.param((1, 1), marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_token_logprobs_matches_eager(backend, chunks, with_bias):
    gen = torch.Generator().manual_seed(2)
    n, hsize, v = 37, 24, 301
    hidden = torch.randn(n, hsize, generator=gen, requires_grad=True)
    weight = (torch.randn(v, hsize, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(v, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = -100
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())

    lp, h = kernels.linear_token_logprobs(hidden, weight, targets, 0.9, bias=bias, token_chunk=chunks[0],
                                          vocab_chunk=chunks[1])
    got = torch.autograd.grad((lp * w_lp + h * w_h).sum(), inputs)
    lp_r, h_r = reference.linear_token_logprobs(hidden, weight, targets, 0.9, bias)
    expected = torch.autograd.grad((lp_r * w_lp + h_r * w_h).sum(), inputs)
    assert_close(lp, lp_r, 1e-5)
    assert_close(h, h_r, 1e-5)
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-4)


def test_linear_frozen_head_and_batched_hidden(backend):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen)  # frozen: no grad_weight work
    targets = torch.randint(0, 50, (2, 5), generator=gen)
    lp, h = kernels.linear_token_logprobs(hidden, weight, targets, 1.0, vocab_chunk=16)
    assert lp.shape == (2, 5)
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    lp_r, _ = reference.linear_token_logprobs(hidden, weight, targets, 1.0)
    (g_r,) = torch.autograd.grad(lp_r.sum(), hidden)
    assert_close(lp, lp_r, 1e-5)
    assert_close(g, g_r, 1e-5)


def test_linear_bf16(backend):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 32, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(200, 32, generator=gen) * 0.2).bfloat16().requires_grad_()
    targets = torch.randint(0, 200, (20,), generator=gen)
    lp, _ = kernels.linear_token_logprobs(hidden, weight, targets, vocab_chunk=64)
    got = torch.autograd.grad(lp.sum(), (hidden, weight))
    lp_r, _ = reference.linear_token_logprobs(hidden, weight, targets)
    expected = torch.autograd.grad(lp_r.sum(), (hidden, weight))
    assert_close(lp, lp_r, 2e-2)
    for a, b in zip(got, expected):
        assert_close(a.float(), b.float(), 5e-2)


def test_bad_targets_are_errors():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kernels.token_logprobs(torch.randn(2, 5), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kernels.linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([-3, 0]))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), 0.0)


def test_modes_and_fallback(monkeypatch):
    previous = kernels.use("reference")
    try:
        assert kernels.backend_name() == "reference"
        kernels.use("torch")
        assert kernels.backend_name() == "torch"
        kernels.use("auto")
        assert kernels.backend_name() == ("native-cpu" if NATIVE else "torch")
        with pytest.raises(ValueError):
            kernels.use("fast")
        # A build without the extension: auto falls back to torch, native is a clear error.
        monkeypatch.setitem(kernels._loaded, "_native", ImportError("no compiler"))
        assert kernels.backend_name() == "torch"
        with pytest.raises(RuntimeError, match="not built"):
            kernels.use("native")
    finally:
        kernels.use(previous)


@pytest.mark.skipif(NATIVE is None, reason="the native extension is not built in this environment")
def test_native_variants_are_reported():
    isas = NATIVE.available_isas()
    assert isas[-1] == "base" and NATIVE.active_isa() in isas
    with pytest.raises(ValueError):
        NATIVE.set_isa("sse9")
    summed = NATIVE.read_sum(torch.arange(100_003, dtype=torch.float32), 2)
    assert summed == pytest.approx(100_002 * 100_003 / 2, rel=1e-6)


def test_nan_logits_give_nan_like_torch(backend):
    """A diverged model must not be hidden: a NaN logit makes its row's results NaN, other rows stay exact."""
    logits, targets = random_logits(3, 300), random_targets(3, 300)
    logits[1, 123] = float("nan")
    lp, h, g = grads(kernels.token_logprobs, logits, targets, 1.0, torch.ones(3), torch.ones(3))
    lp_r, h_r, _ = grads(reference.token_logprobs, logits, targets, 1.0, torch.ones(3), torch.ones(3))
    assert torch.isnan(lp[1]) and torch.isnan(h[1]) and torch.isnan(g[1]).any()
    assert_close(lp[[0, 2]], lp_r[[0, 2]], 1e-5)
    assert_close(h[[0, 2]], h_r[[0, 2]], 1e-5)
