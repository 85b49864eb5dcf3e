"""torch.compile over the Triton path of every op (on CPU the Triton interpreter runs the kernels, on a GPU the
compiled kernels).

Under torch.compile the launchers run as the custom ops ``torch.ops.kalm_fast.<op>_fwd`` / ``<op>_bwd``: a graph
holds them whole (``fullgraph=True`` compiles, no graph break), Dynamo never traces the launchers, inductor never
relaunches the kernels with tiles of its own. So a compiled run computes exactly what eager computes: every check
here is bit equality of outputs and gradients, with the surrounding graph kept free of arithmetic (outputs returned
as they are, gradients through ``torch.autograd.grad`` with given upstream gradients), and each check also asserts
that both custom ops are in the compiled graphs, so a test cannot pass by running eager code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from conftest import DEVICE, cu_seqlens_of, packed_qkv
from functorch.compile import make_boxed_func
from test_model import TEXTS, tiny_decoder
from torch._dynamo.backends.common import aot_autograd

import kalm_fast
from kalm_fast.model import Embedder


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend(seen: set):
    """aot_eager that records the ops of the forward and backward graphs it is given."""
    def compiler(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def outputs_and_grads(fn, inputs, grads_out):
    """fn(*inputs) -> tuple of outputs; the first len(grads_out) outputs are differentiated with those gradients."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    outs = fn(*inputs)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(outs[:len(grads_out)], wrt, grads_out)
    return [o.detach() for o in outs], list(grads)


def assert_compiled_equals_eager(fn, inputs, grads_out, op: str, backend="record"):
    eager = outputs_and_grads(fn, inputs, grads_out)
    seen: set = set()
    compiled_fn = torch.compile(fn, backend=recording_backend(seen) if backend == "record" else backend,
                                fullgraph=True)
    compiled = outputs_and_grads(compiled_fn, inputs, grads_out)
    if backend == "record":
        assert {f"kalm_fast.{op}_fwd.default", f"kalm_fast.{op}_bwd.default"} <= seen, sorted(seen)
    for kind, got, expected in (("output", compiled[0], eager[0]), ("gradient", compiled[1], eager[1])):
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{kind} {i}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
            assert torch.equal(a, b), f"{kind} {i} differs: max abs {(a.float() - b.float()).abs().max().item():.3g}"
    return compiled


def _attention_inputs(lengths, Hq, Hkv, D, dtype):
    q, k, v, cu, max_s = packed_qkv(lengths, Hq, Hkv, D, dtype)
    grads = (torch.randn_like(q), torch.randn(Hq, q.shape[0], device=DEVICE))  # d out, d lse
    return (q, k, v), cu, max_s, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_compiles_whole_and_equals_eager(dtype):
    """Public API, GQA, lse returned and differentiated (a gradient reaching lse is folded into delta)."""
    (q, k, v), cu, max_s, grads = _attention_inputs([7, 0, 19, 12], 4, 2, 32, dtype)

    def fn(q, k, v):
        return kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_s, return_lse=True)

    assert_compiled_equals_eager(fn, (q, k, v), grads, "flash_attn_varlen")


def test_attention_new_lengths_reuse_the_graph():
    """A second batch with other lengths (T, B and max_seqlen all change) runs through the compiled function (after
    at most one recompilation, for dynamic shapes) and still equals eager."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(recording_backend(set()))

    def fn(q, k, v, cu, max_s):
        return (kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_s),)

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for lengths in ([5, 11], [9, 3, 17], [2, 30, 4, 6]):
        (q, k, v), cu, max_s, (g, _) = _attention_inputs(lengths, 2, 2, 16, torch.float32)
        eager = outputs_and_grads(fn, (q, k, v, cu, max_s), (g,))
        got = outputs_and_grads(compiled, (q, k, v, cu, max_s), (g,))
        assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], eager[0] + eager[1])), lengths
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 3 batches"


def test_pooling_compiles_whole_and_equals_eager():
    """Fused RMSNorm + masked mean + L2 normalize, gradients w.r.t. the hidden states and the norm weight."""
    lengths = [6, 0, 13, 9]
    cu = cu_seqlens_of(lengths)
    T, H = sum(lengths), 48
    hidden = torch.randn(T, H, device=DEVICE, requires_grad=True)
    weight = torch.rand(H, device=DEVICE).add_(0.5).requires_grad_()
    mask = torch.rand(T, device=DEVICE) > 0.3

    def fn(hidden, weight):
        return (kalm_fast.varlen_mean_pool(hidden, cu, mask=mask, norm="rmsnorm", norm_weight=weight),)

    assert_compiled_equals_eager(fn, (hidden, weight), (torch.randn(len(lengths), H, device=DEVICE),),
                                 "varlen_mean_pool")


def test_pooling_layernorm_frozen_weight_compiles():
    """LayerNorm with bias; the weight needs no gradient (the backward op's need flags), padded API."""
    hidden = torch.randn(3, 10, 40, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.rand(40, device=DEVICE, dtype=torch.bfloat16) + 0.5
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(3, 10, device=DEVICE) > 0.4

    def fn(hidden, bias):
        return (kalm_fast.masked_mean_pool(hidden, mask, norm="layernorm", norm_weight=weight, norm_bias=bias),)

    assert_compiled_equals_eager(fn, (hidden, bias), (torch.randn(3, 40, device=DEVICE, dtype=torch.bfloat16),),
                                 "varlen_mean_pool")


@pytest.mark.parametrize("num_mix, reduction, d_grad", [(2, "mean", True), (0, "none", True), (1, "sum", False)])
def test_infonce_compiles_whole_and_equals_eager(num_mix, reduction, d_grad):
    """Focal InfoNCE with mixing (given lambdas) and the stats; without mixing; documents frozen (no dd)."""
    B, G, D = 8, 4, 32
    q = F.normalize(torch.randn(B, D, device=DEVICE), dim=-1).requires_grad_()
    d = F.normalize(torch.randn(B * G, D, device=DEVICE), dim=-1).requires_grad_(d_grad)
    lam = torch.rand(B, num_mix, device=DEVICE) if num_mix else None

    def fn(q, d):
        loss, stats = kalm_fast.focal_infonce(q, d, gamma=0.5, temperature=0.05, num_mix=num_mix, mix_lambda=lam,
                                              reduction=reduction, return_stats=True)
        return (loss, *stats.values())

    grad = torch.rand(B, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    assert_compiled_equals_eager(fn, (q, d), (grad,), "focal_infonce")


def test_inductor_keeps_the_kernels_bits():
    """The default backend (inductor, which generates code around the ops) still runs the kernels as they are."""
    (q, k, v), cu, max_s, grads = _attention_inputs([9, 14], 2, 1, 16, torch.float32)

    def fn(q, k, v):
        return kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_s, return_lse=True)

    assert_compiled_equals_eager(fn, (q, k, v), grads, "flash_attn_varlen", backend="inductor")


def test_embedder_backbone_compiles_whole(byte_tokenizer):
    """``embedder.model.compile(fullgraph=True)``: the padding-free forward (packed attention in every layer, then
    the fused pooling outside the backbone) and its backward equal eager bit for bit, batch after batch of other
    sizes, with one recompilation in all (max_seqlen, an int, becomes symbolic like the tensor sizes: no graph per
    length)."""
    embedder = Embedder(tiny_decoder().to(DEVICE), byte_tokenizer).train()
    seen: set = set()
    counter = torch._dynamo.testing.CompileCounterWithBackend(recording_backend(seen))
    compiled = copy.deepcopy(embedder)
    compiled.model.compile(backend=counter, fullgraph=True)

    def run(e, batch):
        e.zero_grad()
        out = e(batch["input_ids"], batch["attention_mask"])
        out.backward(torch.ones_like(out))
        return [out.detach()] + [p.grad.clone() for p in e.parameters()]

    # the second batch changes every size (tokens, sequences, longest sequence): Dynamo's automatic dynamic shapes
    # then recompile once with all three symbolic, and the third batch reuses that graph
    for texts in (TEXTS[:5], TEXTS[3:6], [t[:9] for t in TEXTS[:4]]):
        batch = {k: v.to(DEVICE) for k, v in embedder.tokenize(texts).items()}
        eager, got = run(embedder, batch), run(compiled, batch)
        assert all(torch.equal(a, b) for a, b in zip(got, eager)), texts
    assert {"kalm_fast.flash_attn_varlen_fwd.default", "kalm_fast.flash_attn_varlen_bwd.default"} <= seen
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 3 batches"


@pytest.mark.gpu
def test_gpu_inductor_keeps_every_kernels_bits():
    """On a GPU, in bf16, at sizes that take the real launch plans (split dK/dV, token splits, several tiles): under
    inductor, which also compiles the code around the ops to Triton, every op gives eager's bits."""
    (q, k, v), cu, max_s, grads = _attention_inputs([300, 17, 1024, 0, 96], 8, 2, 128, torch.bfloat16)
    assert_compiled_equals_eager(lambda q, k, v: kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_s, return_lse=True),
                                 (q, k, v), grads, "flash_attn_varlen", backend="inductor")
    hidden = torch.randn(int(cu[-1]), 896, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.rand(896, device=DEVICE, dtype=torch.bfloat16).add_(0.5).requires_grad_()
    assert_compiled_equals_eager(lambda h, w: (kalm_fast.varlen_mean_pool(h, cu, norm="rmsnorm", norm_weight=w),),
                                 (hidden, weight), (torch.randn(5, 896, device=DEVICE, dtype=torch.bfloat16),),
                                 "varlen_mean_pool", backend="inductor")
    qe = F.normalize(torch.randn(512, 256, device=DEVICE), dim=-1).bfloat16().requires_grad_()
    de = F.normalize(torch.randn(4096, 256, device=DEVICE), dim=-1).bfloat16().requires_grad_()
    lam = torch.rand(512, 2, device=DEVICE)
    assert_compiled_equals_eager(lambda q, d: (kalm_fast.focal_infonce(q, d, gamma=0.5, num_mix=2, mix_lambda=lam),),
                                 (qe, de), (torch.tensor(1.0, device=DEVICE),), "focal_infonce", backend="inductor")


def _opcheck_cases():
    """(op name, args) for torch.library.opcheck: the fake impls against the real outputs (shape, dtype, stride),
    schema (nothing mutated, no aliasing), autograd registration and AOT dispatch, edge cases included."""
    import kalm_fast.kernels.attention
    import kalm_fast.kernels.infonce
    import kalm_fast.kernels.pooling  # noqa: F401  (each registers its ops at import)

    ops = torch.ops.kalm_fast
    cases = []
    for lengths in ([5, 0, 7], [], [0, 0]):  # T == 0 too
        (q, k, v), cu, max_s, _ = _attention_inputs(lengths, 4, 2, 16, torch.float32)
        cases.append(("attention fwd", ops.flash_attn_varlen_fwd.default, (q, k, v, cu, max_s, 0.25)))
        with torch.no_grad():
            out, lse, order = ops.flash_attn_varlen_fwd(q, k, v, cu, max_s, 0.25)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        for dout, dlse in ((torch.randn_like(out), torch.randn_like(lse)), (torch.randn_like(out), None),
                           (None, torch.randn_like(lse))):
            cases.append(("attention bwd", ops.flash_attn_varlen_bwd.default,
                          (dout, dlse, qd, kd, vd, out, lse, cu, order, max_s, 0.25)))
    for lengths, norm in (([4, 0, 9], "layernorm"), ([], "rmsnorm")):  # B == 0 too
        cu = cu_seqlens_of(lengths)
        T = sum(lengths)
        hidden = torch.randn(T, 24, device=DEVICE, requires_grad=True)
        w = torch.rand(24, device=DEVICE, requires_grad=True)
        b = torch.randn(24, device=DEVICE, requires_grad=True) if norm == "layernorm" else None
        mask = (torch.rand(T, device=DEVICE) > 0.3).to(torch.uint8)
        args = (hidden, cu, mask, w, b, norm, 1e-6, True, None, None)
        cases.append(("pooling fwd", ops.varlen_mean_pool_fwd.default, args))
        with torch.no_grad():
            _, p_hat, count = ops.varlen_mean_pool_fwd(*args)
        g = torch.randn(len(lengths), 24, device=DEVICE)
        for need in ((True, True, True), (False, True, False), (True, False, False)):
            cases.append(("pooling bwd", ops.varlen_mean_pool_bwd.default,
                          (g, hidden.detach(), cu, mask, w.detach(), None if b is None else b.detach(), p_hat, count,
                           norm, 1e-6, True, None, None, *need)))
    for num_mix, reduction, grouped in ((2, "mean", False), (0, "none", True), (1, "sum", False)):
        B, G = 6, 3
        q = F.normalize(torch.randn(B, 16, device=DEVICE), dim=-1).requires_grad_()
        d = F.normalize(torch.randn(B * G, 16, device=DEVICE), dim=-1).requires_grad_()
        pos = torch.arange(B, device=DEVICE) * G
        lam = torch.rand(B, num_mix, device=DEVICE) if num_mix else None
        args = (q, d, pos, G, not grouped, 0.05, 0.5, num_mix, lam, reduction)
        cases.append(("infonce fwd", ops.focal_infonce_fwd.default, args))
        with torch.no_grad():
            res = ops.focal_infonce_fwd(*args)
        mixing = num_mix > 0
        saved = (lam, *res[5:8], res[8] if mixing else None, res[9] if mixing else None)
        for need in ((True, True), (False, True), (True, False)):
            cases.append(("infonce bwd", ops.focal_infonce_bwd.default,
                          (torch.rand_like(res[0]), q.detach(), d.detach(), pos, *saved, G, not grouped, 0.05, 0.5,
                           reduction, *need)))
    return cases


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck on every op, forward and backward, including T == 0, B == 0, absent gradients
    (dout or dlse None, need flags off) and InfoNCE without mixing: what inductor and AOT autograd rely on."""
    failures = []
    for name, op, args in _opcheck_cases():
        try:
            torch.library.opcheck(op, args)
        except Exception as e:  # collect every failing case, then report them together
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, "\n".join(failures)
