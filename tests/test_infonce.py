"""Focal InfoNCE with hard-negative mixing (SPEC 4.3): the Triton kernels (under the interpreter on CPU) and the
chunked torch path against the naive oracle -- loss, dq, dd and every stat -- plus ties, p -> 1, determinism, the
sampled-lambda path, the no-(B x N)-tensor guarantee and the input checks.

Tolerances. fp32 inputs: every result within 2x its forward-error bound (tests/bounds.py) of SPEC 4.3 computed in
float64 -- K u times the same quantities on absolute values (|q||d| for the logits, sum |C||d| for dq with C = dL/dz,
...), with the logit errors carried through the softmax and the focal weight. The bound holds for any summation order,
so the verdict is the same on every CPU (AVX-512 or AVX2 BLAS, numpy under the interpreter) and GPU. fp16/bf16
inputs follow the 2x rule (STYLE.md): ``max|out - ref| <= 2 * max|base - ref|`` (+ a few ulps of max|ref| for values
torch happens to get exactly) with ref = the fp32 oracle on the same inputs, base = SPEC 4.3 computed in fp16/bf16.
"""

import bounds
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kalm_fast import ops, reference

BACKENDS = ["torch", "triton"]
GRAD_SCALE = 1.7  # upstream gradient != 1, so the reduction scaling of the backward is checked too


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces the dispatch: 'torch' -> reference.focal_infonce_chunked, 'triton' -> kernels.infonce (interpreter
    on CPU)."""
    monkeypatch.setenv("KALM_FAST_BACKEND", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def torch_ref(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction,
              dtype, parts=None):
    """(loss, stats) of the oracle computed in ``dtype`` (reference.focal_infonce's compute_dtype)."""
    return reference.focal_infonce(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix,
                                         mix_lambda, reduction, return_stats=True, compute_dtype=dtype, parts=parts)


def loss_args(B, N, *, pos_idx=None, group_size=None, in_batch_negatives=True, temperature=0.05, gamma=0.0,
              num_mix=0, mix_lambda=None, reduction="mean"):
    """The positional arguments of the oracle / launchers, with ops' defaults for pos_idx and group_size."""
    G = group_size if group_size is not None else N // B
    if pos_idx is None:
        pos_idx = torch.arange(B, device=DEVICE) * G
    return (pos_idx, G, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction)


def run(fn, q, d, *args, **kwargs):
    """(loss, dq, dd, stats) of fn(q, d, ...) after backward of GRAD_SCALE * loss ("none": a fixed random weighting
    of the per-query losses)."""
    q = q.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    loss, stats = fn(q, d, *args, **kwargs)
    if loss.dim():
        w = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device)
        (loss * w).sum().backward()
    else:
        (loss * GRAD_SCALE).backward()
    return loss.detach(), q.grad, d.grad, {k: v.detach() for k, v in stats.items()}


def ops_loss(q, d, pos_idx, G, in_batch, temperature, gamma, num_mix, lam, reduction, return_stats=False):
    """The public op (dispatching to the forced backend) with the oracle's positional arguments."""
    return ops.focal_infonce(q, d, pos_idx=pos_idx, group_size=G, in_batch_negatives=in_batch,
                             temperature=temperature, gamma=gamma, num_mix=num_mix, mix_lambda=lam, reduction=reduction,
                             return_stats=return_stats)


def run_ops(q, d, args):
    return run(ops_loss, q, d, *args, return_stats=True)


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite entries differ"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def assert_2x(name, out, ref, base, ulps=4):
    """The 2x rule on the max abs error (see the module docstring)."""
    err, base_err = max_err(out, ref), max_err(base, ref)
    finite = ref[torch.isfinite(ref)]
    floor = ulps * torch.finfo(base.dtype).eps * (finite.abs().max().item() if finite.numel() else 0.0)
    assert err <= 2 * base_err + floor, f"{name}: error {err:.3g} > 2 x torch's {base_err:.3g} (+ floor {floor:.2g})"


def fp32_bounds(q, d, args):
    """The forward-error bounds (tests/bounds.py) of (loss, dq, dd, stats) as ``run`` computes them from fp32 q, d."""
    pos_idx, G, in_batch, temperature, gamma, num_mix, lam, reduction = args
    parts = {}
    torch_ref(q, d, *args, dtype=torch.float64, parts=parts)
    B = q.shape[0]
    weights = {"mean": torch.full((B,), 1.0 / B), "sum": torch.ones(B)}.get(reduction)
    upstream = GRAD_SCALE * weights if weights is not None else torch.linspace(0.5, 1.5, B)
    bound = bounds.infonce(q, d, parts["z"], parts["zh"], lam, pos_idx, parts["cand"].cpu(), upstream.double(),
                           gamma, temperature)
    if weights is not None:
        bound["loss"] = (bound["loss"] * weights.double()).sum()
    return bound


def check_against_oracle(out, q, d, args):
    """fp32 inputs: out = (loss, dq, dd, stats) within the forward-error bound of SPEC 4.3 in float64; the
    hardest-negative index must equal the oracle's exactly."""
    ref = run(torch_ref, q, d, *args, dtype=torch.float64)
    bound = fp32_bounds(q, d, args)
    for i, name in enumerate(("loss", "dq", "dd")):
        assert out[i].dtype == torch.float32, f"{name}: dtype {out[i].dtype}"
        bounds.assert_within(name, out[i], ref[i], bound[name])
    for key in ("p_pos", "weight", "hard_neg_logit"):
        bounds.assert_within(key, out[3][key], ref[3][key], bound[key])
    base = run(reference.focal_infonce, q, d, *args, return_stats=True)
    assert torch.equal(out[3]["hard_neg_idx"], base[3]["hard_neg_idx"])


def embeddings(B, N, D, dtype=torch.float32):
    q = F.normalize(torch.randn(B, D, device=DEVICE), dim=-1)
    d = F.normalize(torch.randn(N, D, device=DEVICE), dim=-1)
    return q.to(dtype), d.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# both paths vs the oracle (fp32)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("num_mix", [0, 1, 3])
def test_matches_oracle(backend, gamma, num_mix):
    # B, N not multiples of the interpreter tiles (64 x 128), D = 80 spans two 64-wide chunks of the embedding dim
    B, G, D = 70, 4, 80
    q, d = embeddings(B, B * G, D)
    lam = torch.rand(B, num_mix, device=DEVICE)
    args = loss_args(B, B * G, gamma=gamma, num_mix=num_mix, mix_lambda=lam)
    check_against_oracle(run_ops(q, d, args), q, d, args)


VARIANTS = [
    # (B, G, N (None: B * G), positives, keyword arguments of the loss)
    pytest.param(70, 4, None, "default", dict(in_batch_negatives=False, num_mix=1, gamma=0.5, reduction="none"),
                 id="own-group"),  # own group only, default layout, per-query losses
    pytest.param(70, 5, None, "shuffled-groups",
                 dict(in_batch_negatives=False, num_mix=2, gamma=2.0, reduction="sum"),
                 id="own-group-shuffled"),  # own group only, the groups visited in a shuffled order
    # own groups overlapping (stride 2 < G = 4) and repeated positives: rows of d shared by several queries
    pytest.param(66, 4, 140, "overlap", dict(in_batch_negatives=False, num_mix=1, gamma=0.5), id="own-group-overlap"),
    # in-batch, positives anywhere (a random subset of rows in random order)
    pytest.param(70, 4, None, "permutation", dict(num_mix=3, gamma=0.5), id="in-batch-permuted"),
    # many synthetic negatives (a running top-8)
    pytest.param(40, 4, None, "default", dict(num_mix=7, gamma=0.5), id="in-batch-mix-7"),
    # in-batch, N not a multiple of B (custom pos_idx), fewer queries than one tile
    pytest.param(33, 4, 157, "permutation", dict(num_mix=1, gamma=2.0, reduction="sum"), id="in-batch-ragged"),
]


@pytest.mark.parametrize(("B", "G", "N", "positives", "kwargs"), VARIANTS)
def test_matches_oracle_variants(backend, B, G, N, positives, kwargs):
    N = N if N is not None else B * G
    pos_idx = {
        "default": lambda: None,
        "shuffled-groups": lambda: torch.randperm(B, device=DEVICE) * G,
        "overlap": lambda: torch.arange(B, device=DEVICE) // 2 * 2,  # 0, 0, 2, 2, 4, 4, ...: pairs share a positive
        "permutation": lambda: torch.randperm(N, device=DEVICE)[:B],
    }[positives]()
    q, d = embeddings(B, N, 48)
    lam = torch.rand(B, kwargs["num_mix"], device=DEVICE)
    args = loss_args(B, N, pos_idx=pos_idx, group_size=G, mix_lambda=lam, **kwargs)
    check_against_oracle(run_ops(q, d, args), q, d, args)


def test_only_q_requires_grad(backend):
    """d without requires_grad: the backward skips dd and still gives SPEC 4.3's dq (within the fp32 bound)."""
    B, G, D = 40, 3, 32
    q, d = embeddings(B, B * G, D)
    args = loss_args(B, B * G, gamma=0.5, num_mix=2, mix_lambda=torch.rand(B, 2, device=DEVICE))
    grads = []
    for fn, kw in ((ops_loss, {}), (torch_ref, {"dtype": torch.float64})):
        qg = q.clone().requires_grad_()
        loss = fn(qg, d, *args, **kw)
        (GRAD_SCALE * (loss[0] if isinstance(loss, tuple) else loss)).backward()  # torch_ref returns (loss, stats)
        grads.append(qg.grad)
    assert d.grad is None
    bounds.assert_within("dq", grads[0], grads[1], fp32_bounds(q, d, args)["dq"])


# ----------------------------------------------------------------------------------------------------------------
# ties, p -> 1, low precision, determinism
# ----------------------------------------------------------------------------------------------------------------


def test_ties_pick_lower_index(backend):
    """Exact ties: entries on a coarse dyadic grid make every dot product exact in fp32 (in any summation order), so
    many logits tie exactly; duplicated rows of d add more. The hardest negatives, and hence the mixed negatives and
    the loss, must follow the oracle's rule (ties -> lower index)."""
    B, G, D = 48, 6, 8
    N = B * G
    grid = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], device=DEVICE)
    q = grid[torch.randint(0, 5, (B, D), device=DEVICE)]
    d = grid[torch.randint(0, 5, (N, D), device=DEVICE)]
    # query 0 = all ones; its score 8 with rows 1, N-2 and N-1 is the largest any row can reach: a 3-way tie at the top
    q[0] = 1.0
    d[N - 1] = d[N - 2] = d[1] = 1.0
    lam = torch.rand(B, 3, device=DEVICE)
    args = loss_args(B, N, temperature=0.5, gamma=0.5, num_mix=3, mix_lambda=lam)
    s_neg = (q @ d.t()).scatter(1, args[0][:, None], float("-inf"))
    top2 = s_neg.topk(2, dim=1).values
    assert int((top2[:, 0] == top2[:, 1]).sum()) > B // 4, "most rows should tie at their hardest negative"
    out = run_ops(q, d, args)
    assert out[3]["hard_neg_idx"][0].item() == 1
    check_against_oracle(out, q, d, args)


def test_positive_dominates_finite(backend):
    """p -> 1 (1 - p underflows to 0): loss and gradients stay finite for gamma < 1 and match the oracle."""
    B, G, D = 24, 4, 32
    N = B * G
    q, d = embeddings(B, N, D)
    d[0] = q[0]
    d[1:G] = F.normalize(d[1:G] - (d[1:G] @ q[0])[:, None] * q[0], dim=-1)  # orthogonal to q_0
    args = loss_args(B, N, temperature=0.01, gamma=0.5, in_batch_negatives=False)
    out = run_ops(q, d, args)
    assert out[3]["p_pos"][0].item() == 1.0 and out[3]["weight"][0].item() == 0.0
    for t in out[:3]:
        assert torch.isfinite(t).all()
    check_against_oracle(out, q, d, args)


def test_fp16_two_x_rule(backend):
    B, G, D = 70, 4, 80
    q, d = embeddings(B, B * G, D, torch.float16)
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, B * G, gamma=0.5, num_mix=2, mix_lambda=lam)
    out = run_ops(q, d, args)
    ref = run(reference.focal_infonce, q, d, *args, return_stats=True)
    base = run(torch_ref, q, d, *args, dtype=torch.float16)
    assert out[1].dtype == out[2].dtype == torch.float16
    for i, name in enumerate(("loss", "dq", "dd")):
        assert_2x(name, out[i], ref[i], base[i])
    for key in ("p_pos", "weight", "hard_neg_logit"):
        assert_2x(key, out[3][key], ref[3][key], base[3][key])
    assert torch.equal(out[3]["hard_neg_idx"], ref[3]["hard_neg_idx"])


@pytest.mark.parametrize("in_batch", [True, False])
def test_deterministic(backend, in_batch):
    """Two runs give bit-identical loss and gradients (no atomics; overlapping groups exercise the scatter)."""
    B, G, D = 70, 4, 48
    q, d = embeddings(B, B * G, D)
    pos_idx = torch.arange(B, device=DEVICE) * 2  # groups of 4 at stride 2 overlap: rows shared by two queries
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, B * G, pos_idx=pos_idx, group_size=G, in_batch_negatives=in_batch, gamma=0.5, num_mix=2,
                     mix_lambda=lam)
    first, second = run_ops(q, d, args), run_ops(q, d, args)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# sampled lambda
# ----------------------------------------------------------------------------------------------------------------


def test_sampled_lambda_reproducible_and_used(backend):
    """A seeded generator gives the same loss twice; its lambdas are exactly those of reference.sample_mix_lambda
    with the same seed (passing them explicitly gives the identical loss); another seed changes the loss."""
    B, G, D = 40, 4, 32
    q, d = embeddings(B, B * G, D)

    def loss_with(seed=None, lam=None):
        gen = torch.Generator(device=DEVICE).manual_seed(seed) if seed is not None else None
        return ops.focal_infonce(q, d, num_mix=2, mix_alpha=0.7, generator=gen, mix_lambda=lam, temperature=0.05)

    first = loss_with(seed=123)
    assert torch.equal(first, loss_with(seed=123))
    lam = reference.sample_mix_lambda(B, 2, 0.7, torch.Generator(device=DEVICE).manual_seed(123), DEVICE)
    assert torch.equal(first, loss_with(lam=lam))
    assert not torch.equal(first, loss_with(seed=124))


def test_sampled_lambda_leaves_the_gpu_generators_alone(monkeypatch):
    """A seeded draw of lambda seeds only the forked CPU generator: torch.manual_seed would also reseed every GPU's
    generator (dropout masks, user code), which fork_rng(devices=[]) does not restore. The lambdas are those of the
    seed drawn from the generator."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    state = torch.get_rng_state()
    lam = reference.sample_mix_lambda(6, 2, 0.7, torch.Generator().manual_seed(5), "cpu")
    assert not reseeded and torch.equal(torch.get_rng_state(), state)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)).item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        want = torch.distributions.Beta(torch.tensor(0.7), torch.tensor(0.7)).sample((6, 2))
    assert torch.equal(lam, want)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_sampled_lambda_is_beta(alpha):
    """Kolmogorov-Smirnov: 4000 draws fit Beta(alpha, alpha) and reject Beta(alpha, 2 alpha) (power check)."""
    stats = pytest.importorskip("scipy.stats")
    lam = reference.sample_mix_lambda(2000, 2, alpha, torch.Generator().manual_seed(7), "cpu").flatten().numpy()
    assert ((lam >= 0) & (lam <= 1)).all()
    assert stats.kstest(lam, "beta", args=(alpha, alpha)).pvalue > 1e-3
    assert stats.kstest(lam, "beta", args=(alpha, 2 * alpha)).pvalue < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# memory: never a B x N tensor
# ----------------------------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in elements) that any op returns in fresh memory while active. Outputs that alias
    an input's storage (views, in-place ops, ``set_`` -- the Triton interpreter rebinds argument storages that way)
    allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        shared = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        shared |= {x.data_ptr() for x in inputs if isinstance(x, (torch.UntypedStorage, torch.TypedStorage))}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel and t.untyped_storage().data_ptr() not in shared:
                self.numel, self.op = t.numel(), func
        return out


def test_allocation_recorder_sees_b_by_n():
    """Control: the recorder does catch the naive oracle's (B, N) logits."""
    B, N, D = 64, 256, 8
    q, d = embeddings(B, N, D)
    with _LargestOutput() as rec:
        reference.focal_infonce(q, d, *loss_args(B, N))
    assert rec.numel >= B * N


@pytest.mark.parametrize("in_batch", [True, False])
def test_chunked_never_allocates_b_by_n(in_batch):
    # B * N = 2^24 is 4x the chunk bound and 256x (B + N) * D: a (B, N) tensor cannot hide
    B, N, D = 4096, 4096, 8
    q, d = embeddings(B, N, D)
    q.requires_grad_()
    d.requires_grad_()
    G = 1 if in_batch else 4  # own groups of 4 rows (the gathered (B, G, D) rows are then the chunk's transient)
    args = loss_args(B, N, pos_idx=torch.arange(B) // G * G, group_size=G, in_batch_negatives=in_batch, gamma=0.5,
                     num_mix=2, mix_lambda=torch.rand(B, 2))
    with _LargestOutput() as rec:
        reference.focal_infonce_chunked(q, d, *args).backward()
    assert rec.numel <= max(reference.INFONCE_CHUNK_ELEMS, (B + N) * D), f"{rec.op} made {rec.numel} elements"
    assert rec.numel < B * N


@pytest.mark.parametrize("num_sms", [None, 132], ids=["cpu-plan", "h100-plan"])
def test_triton_glue_never_allocates_b_by_n(monkeypatch, num_sms):
    """Everything torch does around the Triton kernels (launchers, autograd, head) is O((B + N) * D + B * M), plus
    with a GPU's launch plan the split partials (at most ~2 x target x BLOCK x D: a constant, not B x N)."""
    from kalm_fast.kernels import infonce_configs

    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    B, G, D = 256, 4, 8  # B * N = 2^18 = 26 x (B + N) * D
    N = B * G
    allowed = (B + N) * D
    if num_sms is not None:
        monkeypatch.setattr(infonce_configs, "num_sms", lambda device: num_sms)
        plan = infonce_configs.launch_plan(torch.empty(B, D), N, G, True)[0]
        assert plan["fwd_splits"] > 1 and plan["dq_splits"] > 1 and plan["dd_splits"] > 1, plan
        allowed = max(allowed, max(plan["dq_splits"] * B, plan["dd_splits"] * N) * D)
    q, d = embeddings(B, N, D)
    q.requires_grad_()
    d.requires_grad_()
    with _LargestOutput() as rec:
        ops.focal_infonce(q, d, gamma=0.5, num_mix=2, mix_lambda=torch.rand(B, 2), temperature=0.05).backward()
    assert rec.numel <= allowed, f"{rec.op} made {rec.numel} elements"
    assert rec.numel < B * N


# ----------------------------------------------------------------------------------------------------------------
# the launch plan: the looped dimension split so that every pass fills the GPU, merged in a fixed order
# ----------------------------------------------------------------------------------------------------------------


def test_grid_plan_fills_an_h100_at_the_recipe_batch():
    """B = 512 queries (recipes/kalm-v2-mini.yaml), N = 4096, D = 1024 on 132 SMs: every pass >= 2 programs per SM
    (one program per query block would be 4-8); a batch that fills the GPU by itself keeps one split."""
    from kalm_fast.kernels import infonce_configs

    plan = infonce_configs.grid_plan(512, 4096, 1024, 132)
    for kind in ("fwd", "dq", "dd"):
        assert plan[f"{kind}_programs"] >= 264, (kind, plan)
    big = infonce_configs.grid_plan(65536, 8 * 65536, 1024, 132)
    for kind in ("fwd", "dq", "dd"):
        assert big[f"{kind}_splits"] == 1, (kind, big)
        assert big[f"{kind}_tile"] == tuple(infonce_configs.PINNED[(kind, "sm_90", "16bit")][0][:2]), (kind, big)


@pytest.mark.parametrize("B,N,G,in_batch,num_sms", [
    pytest.param(512, 4096, 8, True, 132, id="recipe"),
    pytest.param(1, 7, 7, True, 132, id="one-query"),
    pytest.param(300, 300 * 8, 8, False, 132, id="no-in-batch"),
    pytest.param(16384, 16384 * 8, 8, True, 108, id="a100-16k"),
    pytest.param(70, 280, 4, True, 1, id="interpreter"),
])
def test_grid_plan_invariants(B, N, G, in_batch, num_sms):
    """Each pass: splits >= 1, programs = blocks x splits, every split a non-empty run of whole tiles, and the
    target reached whenever blocks x tiles allow it (else every tile is its own program)."""
    from kalm_fast.kernels import infonce_configs

    plan = infonce_configs.grid_plan(B, N, 1024, num_sms, group_size=G, in_batch_negatives=in_batch)
    assert plan["target"] == infonce_configs.PROGRAMS_PER_SM * num_sms
    for kind in ("fwd", "dq", "dd"):
        blocks, per_block = infonce_configs._tiles_per_block(kind, B, N, plan[f"{kind}_tile"], G, in_batch)
        splits = plan[f"{kind}_splits"]
        assert 1 <= splits <= per_block and plan[f"{kind}_programs"] == blocks * splits  # no empty split
        assert plan[f"{kind}_programs"] >= min(plan["target"], blocks * per_block), (kind, plan)
        if splits > 1:  # the fewest splits that reach the target: the partials stay under (target + blocks) rows
            assert blocks * (splits - 1) < plan["target"], (kind, plan)
    with pytest.raises(ValueError, match="num_sms"):
        infonce_configs.grid_plan(B, N, 1024, 0)


@pytest.mark.parametrize("in_batch", [True, False])
def test_splits_bitwise_reproducible_and_within_bound(monkeypatch, in_batch):
    """Many splits: two runs bitwise equal (partials merged in split order, no atomics); many splits and one split
    both within the fp32 forward-error bound of SPEC 4.3 in float64, with the same hardest negatives."""
    from kalm_fast.kernels import infonce_configs

    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    B, G, D = 40, 8, 48
    q, d = embeddings(B, B * G, D)
    pos_idx = torch.arange(B, device=DEVICE) * G
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, B * G, pos_idx=pos_idx, group_size=G, in_batch_negatives=in_batch, gamma=0.5, num_mix=2,
                     mix_lambda=lam)
    monkeypatch.setattr(infonce_configs, "num_sms", lambda device: 64)
    plan = infonce_configs.launch_plan(q, B * G, G, in_batch)[0]
    if in_batch:
        assert plan["fwd_splits"] >= 3 and plan["dq_splits"] >= 3, plan
    many, again = run_ops(q, d, args), run_ops(q, d, args)
    for a, b in zip(many[:3], again[:3]):
        assert torch.equal(a, b)
    monkeypatch.setattr(infonce_configs, "num_sms", lambda device: 1)
    monkeypatch.setattr(infonce_configs, "PROGRAMS_PER_SM", 1)
    assert infonce_configs.launch_plan(q, B * G, G, in_batch)[0]["fwd_splits"] == 1
    one = run_ops(q, d, args)
    check_against_oracle(many, q, d, args)
    check_against_oracle(one, q, d, args)
    assert torch.equal(many[3]["hard_neg_idx"], one[3]["hard_neg_idx"])


def _mixed_case(D, in_batch):
    """(q, d, the oracle's arguments, the launch plan's config rows) of 40 queries with 4 documents each, 2 mixed
    negatives and gamma 0.5, in-batch or grouped."""
    from kalm_fast.kernels import infonce_configs

    B, G = 40, 4
    q, d = embeddings(B, B * G, D)
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, B * G, group_size=G, in_batch_negatives=in_batch, gamma=0.5, num_mix=2, mix_lambda=lam)
    return q, d, args, infonce_configs.launch_plan(q, B * G, G, in_batch)[1]


def _assert_same_bits(a, b):
    for name, x, y in zip(("loss", "dq", "dd"), a[:3], b[:3]):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("in_batch", [True, False])
def test_resident_backward_equals_streaming_bitwise(monkeypatch, in_batch):
    """D <= BLOCK_K: the three kernels keep their own rows on chip, dq/dd also the accumulator (RESIDENT: one write of
    the partial, each tile read once), and give the same bits as the streaming path (scores over BLOCK_K chunks,
    read-modify-write of the fp32 partial slice by slice), which runs the same dots in the same order; D = 80 > 64
    streams (test_matches_oracle)."""
    from kalm_fast.kernels import infonce_configs

    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    q, d, args, rows = _mixed_case(48, in_batch)
    assert all(infonce_configs.resident(48, row[2]) for row in rows.values())
    on_chip = run_ops(q, d, args)
    monkeypatch.setattr(infonce_configs, "resident", lambda D, block_k: False)
    _assert_same_bits(on_chip, run_ops(q, d, args))
    check_against_oracle(on_chip, q, d, args)


@pytest.mark.parametrize("in_batch", [True, False])
def test_prefetch_off_same_bits(monkeypatch, in_batch):
    """The streaming backward with its accumulator prefetch (the default) and without (KALM_FAST_INFONCE_PREFETCH=0,
    the bench's A/B): the same dots in the same order, so the same bits; D = 150 streams three BLOCK_K = 64 slices of
    the interpreter tile, the last one partial."""
    from kalm_fast.kernels import infonce_configs

    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    q, d, args, rows = _mixed_case(150, in_batch)
    assert not any(infonce_configs.resident(150, row[2]) for row in rows.values())
    assert infonce_configs.prefetch()
    on = run_ops(q, d, args)
    monkeypatch.setenv("KALM_FAST_INFONCE_PREFETCH", "0")
    assert not infonce_configs.prefetch()
    _assert_same_bits(on, run_ops(q, d, args))
    check_against_oracle(on, q, d, args)


def test_resident_rows_for_the_recipe_mrl_dims():
    """The recipe's Matryoshka dims 64 and 128 (recipes/kalm-v2-mini.yaml) find a 16-bit dq and dd config whose
    BLOCK_K holds the whole embedding on every tabled arch (sm_100's dd only among its resident-only rows: every dd
    config with BLOCK_K >= 64 spills streaming D = 896/1024 there), and the plan puts such rows first."""
    from kalm_fast.kernels import infonce_configs

    for arch in ("sm_80", "sm_90", "sm_100"):
        for kind in ("dq", "dd"):
            for D in (64, 128):
                rows = infonce_configs.plan_rows((kind, arch, "16bit"), D, 232_448 if arch != "sm_80" else 166_912)
                assert any(infonce_configs.resident(D, r[2]) for r in rows), (kind, arch, D, rows)
    assert not any(infonce_configs.resident(64, r[2]) for r in infonce_configs.PINNED[("dd", "sm_100", "16bit")])


def test_plan_rows_resident_only_where_resident(monkeypatch):
    """plan_rows: the key's rows that fit the device (none: the smallest, as pick), then its resident-only rows
    where they hold D in one slice (the only variants the compile tables verified them for) and fit."""
    from kalm_fast.kernels import infonce_configs

    table = {("dd", "sm_x", "16bit"): [(64, 64, 32, 4, 3, 200), (32, 64, 32, 4, 2, 100)],
             ("dd", "sm_x", "16bit", "resident"): [(64, 64, 256, 8, 2, 150), (64, 64, 64, 4, 4, 90)]}
    monkeypatch.setattr(infonce_configs, "PINNED", table)
    key = ("dd", "sm_x", "16bit")
    assert infonce_configs.plan_rows(key, 64, 1000) == [*table[key], *table[(*key, "resident")]]
    assert infonce_configs.plan_rows(key, 128, 1000) == [*table[key], (64, 64, 256, 8, 2, 150)]
    assert infonce_configs.plan_rows(key, 1024, 1000) == table[key]
    assert infonce_configs.plan_rows(key, 64, 120) == [(32, 64, 32, 4, 2, 100), (64, 64, 64, 4, 4, 90)]
    assert infonce_configs.plan_rows(key, 1024, 50) == [(32, 64, 32, 4, 2, 100)]


def test_fp16_tiny_upstream_gradient_keeps_its_bits(monkeypatch):
    """dz = g (1[pos] - P) with g ~ upstream / B is scaled by a power of two before its cast to fp16 and back after
    the dots: the gradients of 2^-16 x loss are those of the loss times 2^-16 up to the fp16 rounding of the result.
    Unscaled, the negatives' dz (~2^-28 here) would flush to zero under fp16's smallest subnormal (2^-24)."""
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    B, G, D = 32, 4, 64
    q, d = embeddings(B, B * G, D, torch.float16)
    grads = []
    for s in (1.0, 2.0 ** -16):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        (ops.focal_infonce(qq, dd, group_size=G, temperature=0.05, gamma=0.5) * s).backward()
        grads.append((qq.grad.float(), dd.grad.float()))
    for name, full, tiny in zip(("dq", "dd"), *grads):
        expect = full * 2.0 ** -16
        err = (tiny - expect).abs()
        tol = 2.0 ** -10 * expect.abs() + 2.0 ** -24
        assert (err <= tol).all(), f"{name}: {(err - tol).max().item():.3g} over the fp16 rounding"
        assert expect.abs().max() > 2.0 ** -18  # not a vacuous comparison of zeros


# ----------------------------------------------------------------------------------------------------------------
# results and input checks of the public op
# ----------------------------------------------------------------------------------------------------------------


def test_return_types(backend):
    q, d = embeddings(10, 30, 16)
    loss = ops.focal_infonce(q, d)
    assert loss.shape == () and loss.dtype == torch.float32
    per_query, stats = ops.focal_infonce(q, d, reduction="none", return_stats=True, num_mix=1,
                                         mix_lambda=torch.full((10, 1), 0.3))
    assert per_query.shape == (10,)
    assert set(stats) == {"p_pos", "weight", "hard_neg_logit", "hard_neg_idx"}
    assert stats["hard_neg_idx"].dtype == torch.int64 and stats["p_pos"].shape == (10,)


def test_no_negative_stats(backend):
    """Own group of one row: no negative at all -> hard_neg_logit -inf, hard_neg_idx -1; p = 1, loss 0."""
    q, d = embeddings(6, 6, 16)
    loss, stats = ops.focal_infonce(q, d, in_batch_negatives=False, reduction="none", return_stats=True)
    assert torch.equal(stats["hard_neg_idx"], torch.full((6,), -1))
    assert torch.isneginf(stats["hard_neg_logit"]).all()
    assert torch.equal(loss, torch.zeros(6))  # log p = (z_pos - m) - log2(1) = 0 exactly on both paths


def test_nan_query_stats(backend):
    """A query with a NaN embedding has no hardest negative either: hard_neg_idx -1, hard_neg_logit -inf on both
    paths (the torch path's running top value was NaN there); its loss is NaN, the other queries' are untouched."""
    q, d = embeddings(4, 16, 16)
    clean = ops.focal_infonce(q, d, reduction="none")
    q = q.clone()
    q[1, 3] = float("nan")
    loss, stats = ops.focal_infonce(q, d, reduction="none", return_stats=True)
    assert stats["hard_neg_idx"][1] == -1 and torch.isneginf(stats["hard_neg_logit"][1])
    assert (stats["hard_neg_idx"][[0, 2, 3]] >= 0).all() and stats["hard_neg_logit"][[0, 2, 3]].isfinite().all()
    assert loss[1].isnan() and torch.equal(loss[[0, 2, 3]], clean[[0, 2, 3]])



def test_mixing_never_reads_before_d():
    """A query whose scores are NaN (a NaN embedding) never enters the running top list, so its top_i stays -1 as for
    a query without negatives. The mixing kernels index d with top_i (synthetic logits; step 5 of dq): a -1 there
    must not read the row before d, an out-of-bounds read on a GPU. Here that row is an inf sentinel in the same
    buffer: nothing read from it may reach the outputs (the mixed norm |lam d_a + (1 - lam) d_b| is at most the
    largest row norm of d)."""
    from kalm_fast.kernels import infonce as kern

    B, D, M = 3, 16, 1
    buf = torch.randn(2 * B + 1, D, device=DEVICE)
    buf[0] = float("inf")
    d = buf[1:]  # d[-1] would be the sentinel
    top_i = torch.tensor([[0, 1], [-1, -1], [4, 2]], device=DEVICE, dtype=torch.int32)
    top_v = torch.tensor([[0.5, 0.25], [float("-inf")] * 2, [0.75, 0.5]], device=DEVICE)
    lam = torch.full((B, M), 0.25, device=DEVICE)
    zh = torch.empty(B, M, device=DEVICE)
    nrm = torch.empty(B, M, device=DEVICE)
    kern._infonce_mix_kernel[(1,)](d, top_v, top_i, lam, zh, nrm, B, D, d.stride(0), 20.0,
                                   NUM_MIX=M, NUM_TOP=M + 1, BLOCK_B=4, BLOCK_K=16)
    assert (nrm <= d.norm(dim=1).max() * (1 + 1e-5)).all(), nrm
    assert torch.isneginf(zh[1]).all() and torch.isfinite(zh[[0, 2]]).all(), zh
    part = torch.zeros(2, B, D, device=DEVICE)
    scale = torch.ones(2, device=DEVICE)
    c = torch.tensor([1.0, 0.0, 1.0], device=DEVICE)  # a synthetic logit of -inf has probability 0: no step-5 term
    out = kern._merge_rows(part, torch.empty(B, D, device=DEVICE), scale, d, top_i, c, c[:, None].clone(), 0.05)
    assert torch.equal(out[1], torch.zeros(D, device=DEVICE)), out[1]
    assert torch.allclose(out[0], 20.0 * (d[0] + d[1])) and torch.allclose(out[2], 20.0 * (d[4] + d[2]))

def _bad(**changes):
    B, G, D = 4, 3, 8
    kw = dict(q=torch.randn(B, D), d=torch.randn(B * G, D))
    kw.update(changes)
    return kw


BAD_INPUTS = [
    (_bad(q=torch.randn(8)), ValueError, "q must be 2-D"),
    (_bad(d=torch.randn(2, 12, 8)), ValueError, "d must be 2-D"),
    (_bad(q=torch.randint(0, 3, (4, 8))), TypeError, "q must have dtype"),
    (_bad(d=torch.randn(12, 8, dtype=torch.float64)), TypeError, "d must have dtype"),
    (_bad(d=torch.randn(12, 8).half()), TypeError, "q and d must share a dtype"),
    (_bad(d=torch.randn(12, 6)), ValueError, "same embedding size"),
    (_bad(q=torch.randn(0, 8)), ValueError, "non-empty"),
    (_bad(d=torch.randn(13, 8)), ValueError, r"N \(13\) must be a multiple of B \(4\)"),
    (_bad(pos_idx=torch.tensor([0, 3, 6, 12])), ValueError, r"pos_idx values must be in \[0, N=12\)"),
    (_bad(pos_idx=torch.tensor([0, 3, -1, 9])), ValueError, r"pos_idx values must be in \[0, N=12\)"),
    (_bad(pos_idx=torch.tensor([0, 3, 6])), ValueError, r"pos_idx must be \(4,\)"),
    (_bad(pos_idx=torch.tensor([0.0, 3, 6, 9])), TypeError, "pos_idx must have dtype"),
    (_bad(group_size=0), ValueError, "group_size must be a positive int"),
    (_bad(group_size=4), ValueError, "group_size=4 needs B \\* G = 16 rows of d"),
    (_bad(pos_idx=torch.tensor([0, 3, 6, 10]), in_batch_negatives=False), ValueError, "runs past N=12"),
    (_bad(q=torch.randn(3, 8), d=torch.randn(3, 8), num_mix=2), ValueError, "num_mix=2 needs at least 3 negatives"),
    (_bad(in_batch_negatives=False, num_mix=2), ValueError, "num_mix=2 needs at least 3 negatives.*own-group"),
    (_bad(num_mix=1, mix_lambda=torch.tensor([[0.5], [1.2], [0.1], [0.0]])), ValueError,
     r"mix_lambda values must lie in \[0, 1\]"),
    (_bad(num_mix=1, mix_lambda=torch.tensor([[0.5], [-0.1], [0.1], [0.0]])), ValueError,
     r"mix_lambda values must lie in \[0, 1\]"),
    (_bad(num_mix=2, mix_lambda=torch.rand(4, 1)), ValueError, r"mix_lambda must have shape \(B, num_mix\)"),
    (_bad(num_mix=1, mix_lambda=torch.rand(4)), ValueError, "mix_lambda must be 2-D"),
    (_bad(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (_bad(temperature=-0.05), ValueError, "temperature must be a finite number > 0"),
    (_bad(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (_bad(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
    (_bad(gamma=-0.5), ValueError, "gamma must be a finite number >= 0"),
    (_bad(mix_alpha=0.0), ValueError, "mix_alpha must be a finite number > 0"),
    (_bad(num_mix=-1), ValueError, "num_mix must be an int >= 0"),
    (_bad(num_mix=1.0), ValueError, "num_mix must be an int >= 0"),
    (_bad(reduction="avg"), ValueError, "reduction must be 'mean', 'sum' or 'none'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        ops.focal_infonce(kwargs.pop("q"), kwargs.pop("d"), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# GPU (Triton compiled): bf16, large batches, memory
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("in_batch", [True, False])
def test_gpu_bf16_two_x_rule(monkeypatch, in_batch):
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    B, G, D = 1000, 8, 768
    q, d = embeddings(B, B * G, D, torch.bfloat16)
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, B * G, in_batch_negatives=in_batch, gamma=0.5, num_mix=2, mix_lambda=lam)
    out = run_ops(q, d, args)
    ref = run(reference.focal_infonce, q, d, *args, return_stats=True)
    base = run(torch_ref, q, d, *args, dtype=torch.bfloat16)
    for i, name in enumerate(("loss", "dq", "dd")):
        assert_2x(name, out[i], ref[i], base[i])
    for key in ("p_pos", "weight", "hard_neg_logit"):
        assert_2x(key, out[3][key], ref[3][key], base[3][key])


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("B,D", [(16384, 1024), (65536, 256)])
def test_gpu_large_batch(monkeypatch, B, D):
    """Large contrastive batches (G = 8: N = 128k / 512k) against the chunked fp32 torch path on the same bf16 inputs
    (the naive oracle would need B * N * 4 bytes several times over). The kernels differ from fp32 math on these
    inputs only by rounding dz to bf16 before the tensor-core dot (2^-8 relative per element): 1e-2 relative
    Frobenius error on the gradients bounds that with margin; the loss, without that rounding, to 1e-4. Memory:
    the peak growth over one ``run_ops`` stays O((B + N) * D): its bf16 input clones (2 bytes per element), the
    fp32 scratch (4) and the bf16 gradients (2) -- at most 8 * (B + N) * D bytes plus O(B * M) -- far below the
    4 * B * N bytes of one fp32 logit matrix. Two runs are bit-identical."""
    G = 8
    N = B * G
    q, d = embeddings(B, N, D, torch.bfloat16)
    lam = torch.rand(B, 2, device=DEVICE)
    args = loss_args(B, N, gamma=0.5, num_mix=2, mix_lambda=lam)
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    run_ops(q, d, args)  # autotuning
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    out = run_ops(q, d, args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base_mem
    assert peak <= 8 * (B + N) * D + 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert peak < B * N  # a quarter of one fp32 (B, N) matrix
    again = run_ops(q, d, args)
    for a, b in zip(out[:3], again[:3]):
        assert torch.equal(a, b)
    monkeypatch.setenv("KALM_FAST_BACKEND", "torch")
    ref = run_ops(q, d, args)
    assert abs(out[0].item() - ref[0].item()) <= 1e-4 * abs(ref[0].item())
    assert _rel_err(out[1], ref[1]) <= 1e-2 and _rel_err(out[2], ref[2]) <= 1e-2
    assert (out[3]["hard_neg_idx"] == ref[3]["hard_neg_idx"]).float().mean() > 0.999  # near-ties may flip

