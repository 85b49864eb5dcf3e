"""fp32 forward-error bounds for the kernel tests: the tolerance of every fp32 comparison, on any CPU or GPU.

Why: two fp32 implementations of one formula differ by rounding, and how much depends on the summation order the
BLAS picks (AVX-512 vs AVX2 kernels of MKL/oneDNN, numpy's OpenBLAS under the Triton interpreter, tensor-core tiles on
a GPU). A tolerance taken from one run of torch ("2x torch's error") is noise at that level: it passes or fails by
machine. A forward-error bound holds for *every* summation order, so it is the same verdict on every machine.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., ch. 3), to first order in u = 2^-24:
- a sum or dot product of K terms, in any order:  |fl(s) - s| <= K u sum|terms|;
- an elementary operation (+, *, /, exp, log, sqrt): one relative rounding u of its result;
- errors in the operands propagate through first derivatives (exp: |dP| = P |dS|; products: |a||db| + |b||da|).
Each function below computes the exact value in float64 (the truth) and, beside it, the bound: the same quantity
evaluated in float64 on absolute values (sum|q||k|, sum P|v|, ...) times K u, plus the propagated operand errors.
Tests assert ``|kernel - truth| <= SLACK * bound`` elementwise. SLACK = 2 absorbs the handful of roundings each
formula below counts only as a constant and the second-order terms; it is far below what any real bug gives (a
wrong mask, scale, index or sign moves results by O(1) relative, the bounds are 1e-6..1e-3 relative).

An absolute floor of TINY per element covers underflow to zero of terms below fp32's smallest normal number.
"""

from __future__ import annotations

import torch

U = 2.0**-24  # unit roundoff of fp32 (round to nearest)
SLACK = 2.0
TINY = 1e-30


def _f64(x):
    return None if x is None else x.detach().to("cpu", torch.float64)


def assert_within(name: str, got: torch.Tensor, truth: torch.Tensor, bound: torch.Tensor, slack: float = SLACK):
    """|got - truth| <= slack * bound + TINY elementwise (non-finite entries must match exactly); the message names
    the worst entries and how far past their bound they are."""
    got, truth, bound = (x.detach().to("cpu", torch.float64) for x in (got, truth, bound))
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ from the truth"
    assert torch.equal(got[~finite], truth[~finite]), f"{name}: non-finite entries differ from the truth"
    err = torch.where(finite, (got - truth).abs(), 0.0)
    limit = slack * torch.where(finite, bound, 0.0) + TINY
    bad = err > limit
    if bad.any():
        ratio = err / limit
        worst = torch.topk(ratio.flatten(), min(5, int(bad.sum()))).indices
        rows = []
        for flat in worst.tolist():
            i = tuple(int(t) for t in torch.unravel_index(torch.tensor(flat), err.shape))
            rows.append(f"  {i}: got {got[i].item():.9g}, truth {truth[i].item():.9g}, err {err[i].item():.3g} "
                        f"> {limit[i].item():.3g} ({ratio[i].item():.1f}x the bound)")
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} entries outside {slack} x the fp32 forward-error "
                             f"bound (tests/bounds.py)\n" + "\n".join(rows))


# ----------------------------------------------------------------------------------------------------------------
# attention: out = softmax(scale Q K^T) V per sequence and head; lse; dq, dk, dv of <out, dout> + <lse, dlse>
# ----------------------------------------------------------------------------------------------------------------


def attention(q, k, v, cu_seqlens, dout, dlse=None, scale=None) -> tuple[dict, dict]:
    """Truth and bound for out (T, Hq, D), lse (Hq, T), dq (T, Hq, D), dk/dv (T, Hkv, D).

    q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,), dout (T, Hq, D), dlse (Hq, T) or None. Per sequence of length L
    and query head (GQA: Hq / Hkv = G query heads share a key head), with A = scale |Q||K|^T:
      1. scores S = scale Q K^T:         e_S = D u A + 3 u |S|   (dot, the scale, exp2's log2(e) folding)
      2. lse_i = log sum_j e^S_ij:        e_lse = max_j e_S_ij + (L + 4) u + u |lse|
      3. P_ij = e^(S_ij - lse_i):         e_P / P <= rho = e_S + e_lse + 4 u
      4. out = P V (online rescaling: at most L more roundings): e_out = (P (rho + 2 (L + 2) u)) |V|
      5. dV = P^T dO over L G terms:      e_dV = (P (rho + (L G + 1) u))^T |dO|
      6. dP = dO V^T, Delta_i = dO_i . out_i, Gm = dP - Delta + dlse:
         e_Gm = D u |dO||V|^T + D u |dO|.|out| + |dO|.e_out + 2 u (|dP| + |Delta| + |dlse|)
      7. dS = P Gm:                       e_dS = P (rho |Gm| + e_Gm + u |Gm|)
      8. dQ = scale dS K, dK = scale dS^T Q (L G terms): e = scale (e_dS |K| + (L + 1) u |dS||K|), transposed alike.
    """
    q, k, v, dout, dlse = (_f64(x) for x in (q, k, v, dout, dlse))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = scale if scale is not None else D**-0.5
    zeros = torch.zeros_like
    truth = dict(out=zeros(q), lse=torch.full((Hq, T), float("-inf"), dtype=torch.float64), dq=zeros(q),
                 dk=zeros(k), dv=zeros(v))
    bound = {name: zeros(t) for name, t in truth.items()}
    bound["lse"] = torch.zeros(Hq, T, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        L = e - s
        if L == 0:
            continue
        Q = q[s:e].transpose(0, 1)  # (Hq, L, D)
        K = k[s:e].transpose(0, 1).repeat_interleave(G, 0)
        V = v[s:e].transpose(0, 1).repeat_interleave(G, 0)
        dO = dout[s:e].transpose(0, 1)
        dl = dlse[:, s:e] if dlse is not None else torch.zeros(Hq, L, dtype=torch.float64)
        S = scale * Q @ K.transpose(1, 2)  # (Hq, L, L)
        e_S = D * U * scale * (Q.abs() @ K.abs().transpose(1, 2)) + 3 * U * S.abs()  # step 1
        lse = torch.logsumexp(S, -1)  # (Hq, L)
        e_lse = e_S.amax(-1) + (L + 4) * U + U * lse.abs()  # step 2
        P = torch.exp(S - lse[..., None])
        rho = e_S + e_lse[..., None] + 4 * U  # step 3
        out = P @ V
        e_out = (P * (rho + 2 * (L + 2) * U)) @ V.abs()  # step 4
        dV = P.transpose(1, 2) @ dO
        e_dV = (P * (rho + (L * G + 1) * U)).transpose(1, 2) @ dO.abs()  # step 5
        dP = dO @ V.transpose(1, 2)
        delta = (dO * out).sum(-1)
        Gm = dP - delta[..., None] + dl[..., None]
        e_Gm = (D * U * (dO.abs() @ V.abs().transpose(1, 2)) + (D * U * (dO * out).abs().sum(-1)
                + (dO.abs() * e_out).sum(-1))[..., None]
                + 2 * U * (dP.abs() + delta.abs()[..., None] + dl.abs()[..., None]))  # step 6
        dS = P * Gm
        e_dS = P * (rho * Gm.abs() + e_Gm + U * Gm.abs())  # step 7
        dQ = scale * dS @ K
        e_dQ = scale * (e_dS @ K.abs() + (L + 1) * U * (dS.abs() @ K.abs()))  # step 8
        dK = scale * dS.transpose(1, 2) @ Q
        e_dK = scale * (e_dS.transpose(1, 2) @ Q.abs() + (L * G + 1) * U * (dS.abs().transpose(1, 2) @ Q.abs()))

        def heads(x):  # (Hq, L, D) -> (L, Hkv, D): sum the G query heads of each key head
            return x.reshape(Hkv, G, x.shape[1], D).sum(1).transpose(0, 1)

        truth["out"][s:e], bound["out"][s:e] = out.transpose(0, 1), e_out.transpose(0, 1)
        truth["lse"][:, s:e], bound["lse"][:, s:e] = lse, e_lse
        truth["dq"][s:e], bound["dq"][s:e] = dQ.transpose(0, 1), e_dQ.transpose(0, 1)
        truth["dk"][s:e], bound["dk"][s:e] = heads(dK), heads(e_dK)
        truth["dv"][s:e], bound["dv"][s:e] = heads(dV), heads(e_dV)
    return truth, bound


# ----------------------------------------------------------------------------------------------------------------
# pooling: out_b = l2normalize(sum_t m_t norm(x_t) / n_b) and its backward
# ----------------------------------------------------------------------------------------------------------------


def _pool(x, x_true, seg, m, B, norm, w, b, eps, normalize, dout, absolute, true_out=None):
    """Forward and backward of the pooling pipeline written out in float64, either exactly (``absolute=False``) or as
    its absolute-value twin (``absolute=True``): every input and product replaced by its magnitude and every
    subtraction by an addition, while divisors (rms, sigma, counts, |pooled|) keep their true positive values --
    the sum of magnitudes whose K u multiple bounds the rounding of any evaluation order. ``true_out`` (the exact
    result) supplies |pooled| and the normalized output to the absolute twin."""
    H = x.shape[1]
    A = (lambda t: t.abs()) if absolute else (lambda t: t)
    sub = (lambda a, c: a + c) if absolute else (lambda a, c: a - c)
    x = A(x)
    w1 = A(w) if w is not None else torch.ones(H, dtype=torch.float64)
    counts = torch.zeros(B, dtype=torch.float64).index_add(0, seg, m).clamp_min(1.0)
    if norm == "rmsnorm":
        xc, r = x, torch.rsqrt(x_true.pow(2).mean(-1, keepdim=True) + eps)  # r: the true 1/rms
    elif norm == "layernorm":
        xc = sub(x, x.mean(-1, keepdim=True))
        r = torch.rsqrt((x_true - x_true.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps)  # 1/sigma
    else:
        xc, r = x, torch.ones(x.shape[0], 1, dtype=torch.float64)
    xh = xc * r  # [T, H] normalized token
    y = xh * w1 + (A(b) if (b is not None and norm == "layernorm") else 0.0)
    pooled = torch.zeros(B, H, dtype=torch.float64).index_add(0, seg, y * m[:, None]) / counts[:, None]
    g = A(dout)
    if normalize:
        src = pooled if true_out is None else true_out["pooled"]
        nrm = src.norm(dim=-1, keepdim=True)
        nrm = torch.where(nrm > 0, nrm, 1.0)  # a row without a pooled token stays 0 (and so does its gradient)
        o = pooled / nrm if true_out is None else true_out["out"].abs()
        out = pooled / nrm
        dpool = sub(g, o * (o * g).sum(-1, keepdim=True)) / nrm  # d l2normalize
    else:
        out, dpool = pooled, g
    dy = dpool[seg] * (m / counts[seg])[:, None]
    dw, db = (dy * xh).sum(0), dy.sum(0)
    if norm is None:
        dx = dy
    else:
        dxh = dy * w1
        proj = xh * (dxh * xh).mean(-1, keepdim=True)
        if norm == "rmsnorm":
            dx = sub(dxh, proj) * r
        else:
            dx = sub(sub(dxh, dxh.mean(-1, keepdim=True)), proj) * r
    return dict(out=out, dhidden=dx, dweight=dw, dbias=db, pooled=pooled)


def pooling(hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize, dout) -> tuple[dict, dict]:
    """Truth and bound for out (B, H), dhidden (T, H), dweight (H,), dbias (H,) of the varlen pooling with a token
    mask (T,) or None; dout (B, H) the upstream gradient. The longest reduction chain is the norm's statistics over
    H, the token sum over n_b, the L2 norm over H and the backward's row dots over H: K = 3 H + n + 16, and the bound
    is K u times the absolute-value twin of the pipeline."""
    x, w, b, g = (_f64(t) for t in (hidden, weight, bias, dout))
    T, H = x.shape
    B = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    seg = torch.repeat_interleave(torch.arange(B), lengths, output_size=T)
    m = torch.ones(T, dtype=torch.float64) if mask is None else (mask.cpu() != 0).to(torch.float64)
    args = (seg, m, B, norm, w, b, eps, normalize, g)
    truth = _pool(x, x, *args, False)
    mags = _pool(x, x, *args, True, true_out=truth)
    K = 3 * H + (int(lengths.max()) if B else 0) + 16
    bound = {k: K * U * v for k, v in mags.items() if k != "pooled"}
    if normalize:  # the error of |pooled| moves every entry of its row: |out| sum_h |out_h| e_pooled_h / |pooled|
        nrm = truth["pooled"].norm(dim=-1, keepdim=True)
        bound["out"] = bound["out"] + truth["out"].abs() * (truth["out"].abs() * K * U * mags["pooled"]).sum(
            -1, keepdim=True) / torch.where(nrm > 0, nrm, 1.0)
    return {k: v for k, v in truth.items() if k != "pooled"}, bound


# ----------------------------------------------------------------------------------------------------------------
# focal InfoNCE (SPEC 4.3): loss, dq, dd and the stats, from the float64 logits and dL/dz
# ----------------------------------------------------------------------------------------------------------------


def infonce(q, d, z, zh, lam, pos_idx, cand, upstream, gamma, temperature) -> dict:
    """Bounds for the per-query loss (B,) (unreduced: the caller applies the weights of the reduction), dq, dd,
    p_pos, weight and hard_neg_logit.

    q (B, D), d (N, D); z (B, N) and zh (B, M) or None the true float64 logits of real and synthetic negatives;
    lam (B, M); cand (B, N) bool candidates; upstream (B,) the gradient reaching each per-query loss (reduction and
    the test's weighting included). With a_i = upstream_i f'(log p_i) (f the focal NLL) the backward coefficients
    are C_ij = a_i (1[j = pos_i] - P_ij) for real candidates and Ch_im = -a_i Ph_im for synthetic ones.
      1. logits: e_z = (D + 3) u |q||d| / tau; a synthetic logit zh = q.(lam d_a + (1 - lam) d_b) / (tau |e|) from five
         dots: e_zh = (D + 8) u (lam |q||d_a| + (1 - lam) |q||d_b|) / (tau |e|) (1 + |e|^-2 (|d_a| + |d_b|)^2)
      2. log p = z_pos - lse over N + M terms: e_logp = e_z,pos + max_j e_z_ij + (N + M + 6) u (1 + |lse|)
      3. P_ij / Ph_im relative error rho = e_z + e_logp; a_i error |upstream f''| e_logp + (few u) |a_i|
      4. e_C = |da| |1[pos] - P| + |a| P rho (+ u |C|)
      5. dq_i = sum_j C_ij d_j / tau + synthetic terms (N + 2 M terms), dd_j = sum_i C_ij q_i / tau (B terms)
      6. loss = sum_i upstream_i f(log p_i) (B terms); p_pos = e^logp; weight = (1 - p)^gamma
    """
    q, d, z = _f64(q), _f64(d), _f64(z)
    B, D = q.shape
    N = d.shape[0]
    M = 0 if zh is None else zh.shape[1]
    nd = d.norm(dim=1)
    rows = torch.arange(B)
    pos = pos_idx.cpu()
    # the same dots, bounded elementwise by Cauchy-Schwarz-free magnitudes |q|.|d| (sum of |q_k d_k|)
    qd_abs = q.abs() @ d.abs().t()
    e_z = (D + 3) * U * qd_abs / temperature
    e_z = torch.where(cand, e_z, 0.0)
    lse_terms = [z.masked_fill(~cand, float("-inf"))]
    e_max = e_z.amax(1)
    if M:
        zh = _f64(zh)
        lse_terms.append(zh)
    lse = torch.logsumexp(torch.cat(lse_terms, 1), 1)
    logp = z[rows, pos] - lse
    if M:
        a_idx, b_idx = _mix_partners(z, cand, pos, M)
        lam = _f64(lam)
        ev = lam[..., None] * d[a_idx][:, None, :] + (1 - lam[..., None]) * d[b_idx]  # (B, M, D)
        en = ev.norm(dim=-1)
        mag = lam * qd_abs[rows, a_idx][:, None] + (1 - lam) * qd_abs.gather(1, b_idx)
        e_zh = (D + 8) * U * mag / (temperature * en) * (1 + (nd[a_idx][:, None] + nd[b_idx]) ** 2 / en**2)
        e_max = torch.maximum(e_max, e_zh.amax(1))
    e_logp = e_z[rows, pos] + e_max + (N + M + 6) * U * (1 + lse.abs())
    f1 = _focal_d1(logp, gamma)
    f2 = _focal_d2(logp, gamma)
    a = upstream * f1
    e_a = (upstream * f2).abs() * e_logp + 8 * U * a.abs()
    P = torch.where(cand, torch.exp(z - lse[:, None]), 0.0)
    onehot = torch.zeros(B, N, dtype=torch.float64)
    onehot[rows, pos] = 1.0
    C = a[:, None] * (onehot - P)
    rho = e_z + e_logp[:, None]
    e_C = e_a[:, None] * (onehot - P).abs() + a.abs()[:, None] * P * rho + U * C.abs()
    e_dq = (e_C @ d.abs() + (N + 2 * M + 2) * U * (C.abs() @ d.abs())) / temperature
    e_dd = (e_C.t() @ q.abs() + (B + 2) * U * (C.abs().t() @ q.abs())) / temperature
    if M:
        Ph = torch.exp(zh - lse[:, None])
        Ch = -a[:, None] * Ph
        e_Ch = e_a[:, None] * Ph + a.abs()[:, None] * Ph * (e_zh + e_logp[:, None]) + U * Ch.abs()
        # dq_i += sum_m Ch_im e_im / tau with e_im = ev / |ev| (the coefficients carry lam / |e| and (1 - lam) / |e|)
        e_abs = (lam[..., None] * d.abs()[a_idx][:, None, :] + (1 - lam[..., None]) * d.abs()[b_idx]) / en[..., None]
        e_dq = e_dq + (torch.einsum("bm,bmd->bd", e_Ch, e_abs)
                       + (N + 2 * M + 8) * U * torch.einsum("bm,bmd->bd", Ch.abs(), e_abs)) / temperature
    f0 = _focal(logp, gamma)
    e_loss = f1.abs() * e_logp + (B + 4) * U * f0.abs()  # per query, before the weights of the reduction
    p = logp.exp()
    one_minus_p = -torch.expm1(logp)
    e_weight = gamma * one_minus_p.clamp_min(1e-300).pow(gamma - 1) * p * e_logp + 4 * U * one_minus_p.pow(gamma)
    hard = torch.where(cand & (onehot == 0), e_z, 0.0).amax(1)
    return dict(loss=e_loss, dq=e_dq, dd=e_dd, p_pos=p * e_logp + U * p, weight=e_weight, hard_neg_logit=hard)


def _mix_partners(z, cand, pos, M):
    """Indices of each query's hardest negative (B,) and its 2nd..(M+1)-th (B, M), ties to the lower index."""
    B, N = z.shape
    neg = cand.clone()
    neg[torch.arange(B), pos] = False
    order = torch.sort(z.masked_fill(~neg, float("-inf")), dim=1, descending=True, stable=True).indices
    return order[:, 0], order[:, 1 : M + 1]


def _focal(logp, gamma):
    return -(-torch.expm1(logp)).pow(gamma) * logp


def _focal_d1(logp, gamma):
    """f'(log p) of the focal NLL f = -(1 - p)^gamma log p, in float64."""
    p = logp.exp()
    omp = -torch.expm1(logp)
    r = torch.where(omp > 0, logp / omp.clamp_min(1e-300), -1.0)
    return omp.pow(gamma) * (gamma * p * r - 1.0)


def _focal_d2(logp, gamma):
    """f''(log p) by a central difference of f' in float64 (step 1e-6 of the value; f' is smooth for log p < 0)."""
    h = 1e-6 * logp.abs().clamp_min(1e-3)
    hi = (logp + h).clamp(max=0.0)
    return (_focal_d1(hi, gamma) - _focal_d1(logp - h, gamma)) / (hi - (logp - h))


# ----------------------------------------------------------------------------------------------------------------
# whole networks: two fp32 implementations of one transformer (packed vs padded, kalm_fast vs transformers' SDPA)
# ----------------------------------------------------------------------------------------------------------------


def network_tol(*, layers: int, width: int, ffn: int, seq_len: int, lam: float = 8.0) -> float:
    """Relative tolerance between two fp32 evaluations of one transformer, any summation orders.

    Each layer's longest reduction chain is the attention's (width over the head dims, seq_len over the keys) and the
    MLP's (width in, ffn out): K = layers (2 width + ffn + seq_len) terms end to end, and LayerNorm/RMSNorm keep each
    layer's conditioning O(1). A worst-case K u bound (~1e-3 here) would say nothing; the probabilistic bound of
    Higham & Mary (SIAM J. Sci. Comput. 41, 2019) holds for any order with rounding errors modeled as independent:
    |error| <= lam sqrt(K) u |x| with probability >= 1 - 2 exp(-lam^2 / 2) per entry (lam = 8: 2.5e-14). Two
    evaluations each within it differ by at most twice that."""
    return 2 * lam * (layers * (2 * width + ffn + seq_len)) ** 0.5 * U
