"""End-to-end fine-tuning step (SPEC 7): kalm_fast's pipeline vs the usual padded transformers pipeline, tokens/s,
peak memory and the largest batch that fits.

    python -m bench.bench_train_step [--smoke] [--device cuda] [--no-write]

One step = B queries and B x G documents (G = 8: the positive, then 7 hard negatives), forward, focal InfoNCE
(tau = 0.02, gamma = 0.5, in-batch negatives, no mixing), backward, AdamW step. Providers, on the same model weights,
the same token ids and lengths, in one run on one device:
  kalm_fast  ``Embedder``: padding-free varlen attention, fused pooling with the final RMSNorm folded in,
             ``ops.focal_infonce``, and the trainer's GradCache (``kalm_fast.train.step.grad_cache``): every
             sequence (queries, then documents) embedded without a graph in chunks of at most ``chunk_tokens`` real
             tokens, the loss on those detached embeddings, then each chunk re-run with its graph and
             back-propagated with its cached embedding gradient. The last chunk keeps its graph from the first
             pass, so a batch of one chunk costs no extra forward.
  hf_sdpa    the sentence-transformers / FlagEmbedding pipeline: ``AutoModel`` with SDPA made bidirectional
             (``config.is_causal = False`` and ``is_causal=False``), queries and documents each one batch padded to
             its longest sequence, torch masked mean + ``F.normalize``, the naive torch loss
             (``reference.focal_infonce``: the B x N logits in fp32), one full-batch backward.
  st_cached_mnrl  sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache, scale 1/tau = 50) on a
             ``SentenceTransformer`` of the same weights (saved, then loaded by its ``Transformer`` module, SDPA made
             bidirectional) with mean pooling: the columns anchor, positive, 7 negatives as ST expects them, padded
             per column, mini-batches of at most ``chunk_tokens`` real tokens (``mini_batch_num_tokens``). Its loss is
             plain InfoNCE (gamma = 0: ST has no focal term), the cost otherwise the same; skipped with a one-line
             reason when sentence-transformers is not importable.
Model: a Qwen2-0.5B-size config (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, vocab 151936, rope
theta 1e6) with random weights, bf16 weights and AdamW state on CUDA (no autocast, so every kernel sees bf16). Off
CUDA a 4-layer hidden-256 Qwen2 in fp32 (the full one takes minutes a step on a CPU); --smoke a 2-layer hidden-64 one
with lengths a tenth as long. Qwen2 has no dropout, so GradCache's second forward needs no saved RNG state; no
gradient checkpointing (GradCache already bounds the activations by one chunk's).

Lengths (token counts, seeded, the same for both providers): queries lognormal with median 24 and sigma 0.5 clipped
to [8, 64]; documents lognormal with median 160 and sigma 0.6 clipped to [16, 512] (mean about 195: a batch padded
to its 512-token document holds ~2.6x its real tokens). Ids are random.

Rows: mode "step": median/p20/p80 ms of whole steps at B = 8 on CUDA (halved until hf_sdpa fits), tokens_per_s =
real (non-pad) tokens of the step / median time, peak memory above the weights and optimizer state (CUDA: allocated
bytes; CPU: growth of the RSS high-water mark). Mode "max_batch" (CUDA, and --smoke): the largest B whose step runs
without running out of memory, by doubling from 1 then bisection to 1/16; its time, tokens/s and peak memory are those
of the one probe step at that B. kalm_fast's search stops at 16x hf_sdpa's max batch (the target is 4x; at most 4096):
its real limit, the memory of one chunk plus the O(N D) embeddings, lies far beyond, at steps of minutes. --smoke caps
both searches at 4 (nothing runs out of memory on a CPU: it exercises the search only).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import common
from kalm_fast import ops, reference

SUITE = "train_step"
OP = "train_step"
G, TEMPERATURE, GAMMA = 8, 0.02, 0.5
LR = 1e-5
PROVIDERS = ("hf_sdpa", "kalm_fast", "st_cached_mnrl")  # hf_sdpa first: its max batch sets the others' search cap
MAX_BATCH_CAP, CAP_OVER_BASELINE, SMOKE_CAP = 4096, 16, 4


@dataclass(frozen=True)
class Size:
    """Model config, length mix ((median, sigma, lo, hi) of the lognormal token counts), step batch, chunk budget."""

    name: str
    config: dict
    query_len: tuple[float, float, int, int]
    doc_len: tuple[float, float, int, int]
    step_batch: int
    chunk_tokens: int


QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
FULL_LENGTHS = dict(query_len=(24.0, 0.5, 8, 64), doc_len=(160.0, 0.6, 16, 512))
# 16k tokens a chunk: enough to fill an H100 with a 0.5B model, ~25 GB of activations in bf16
GPU = Size("Qwen2-0.5B", QWEN2_05B, **FULL_LENGTHS, step_batch=8, chunk_tokens=16384)
CPU = Size("Qwen2 4x256", {**QWEN2_05B, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "intermediate_size": 1024}, **FULL_LENGTHS, step_batch=2, chunk_tokens=4096)
SMOKE = Size("Qwen2 2x64", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=1000, max_position_embeddings=512),
             query_len=(4.0, 0.5, 2, 8), doc_len=(16.0, 0.6, 4, 48), step_batch=2, chunk_tokens=256)


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


# ----------------------------------------------------------------------------------------------------------------
# workload
# ----------------------------------------------------------------------------------------------------------------


def _lognormal_lengths(n: int, spec, gen: torch.Generator) -> list[int]:
    median, sigma, lo, hi = spec
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=gen))
    return x.round().clamp(lo, hi).long().tolist()


@dataclass
class Batch:
    """B queries then B*G documents as one list of sequences; ``ids`` (sum(lengths),) int64 on the CPU, packed."""

    B: int
    lengths: list[int]
    ids: torch.Tensor

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def padded(self, start: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [start, stop) right-padded (id 0) to their longest: input_ids, attention_mask (n, S) int64."""
        lengths = self.lengths[start:stop]
        offset = sum(self.lengths[:start])
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, :n] = self.ids[offset : offset + n]
            mask[i, :n] = 1
            offset += n
        return ids.to(device), mask.to(device)

    def padded_tokens(self) -> int:
        """Tokens hf_sdpa computes: the queries padded to the longest query, the documents to the longest one."""
        q, d = self.lengths[: self.B], self.lengths[self.B :]
        return len(q) * max(q) + len(d) * max(d)


def make_batch(B: int, size: Size, *, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = _lognormal_lengths(B, size.query_len, gen) + _lognormal_lengths(B * G, size.doc_len, gen)
    ids = torch.randint(1, size.config["vocab_size"], (sum(lengths),), generator=gen)
    return Batch(B, lengths, ids)


def _chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``budget`` tokens each (a longer sequence gets its own)."""
    bounds, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    bounds.append((start, len(lengths)))
    return bounds


def build_model(size: Size, device, dtype, *, seed: int = 0):
    """Random-weight Qwen2 base model (no LM head), bidirectional SDPA, training mode."""
    from transformers import AutoModel, Qwen2Config

    config = Qwen2Config(**size.config)
    config.is_causal = False
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).train()


# ----------------------------------------------------------------------------------------------------------------
# the two pipelines: each returns a closure doing forward + loss + backward (gradients left in .grad) -> loss
# ----------------------------------------------------------------------------------------------------------------


def _pos_idx(B: int, device) -> torch.Tensor:
    return torch.arange(B, device=device) * G  # query i's positive is document i*G, its hard negatives follow


def hf_sdpa_pipeline(model, batch: Batch, device) -> Callable[[], torch.Tensor]:
    queries, docs = batch.padded(0, batch.B, device), batch.padded(batch.B, len(batch.lengths), device)
    pos_idx = _pos_idx(batch.B, device)

    def embed(ids, mask):
        hidden = model(input_ids=ids, attention_mask=mask, use_cache=False, is_causal=False).last_hidden_state
        m = mask.to(hidden.dtype)[..., None]  # (n, S, 1)
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    def loss_backward():
        loss = reference.focal_infonce(embed(*queries), embed(*docs), pos_idx, G, True, TEMPERATURE, GAMMA)
        loss.backward()
        return loss.detach()

    return loss_backward


def kalm_fast_embedder(model):
    """The Embedder on ``model`` (prepared in place). Token ids go straight to forward(), so the tokenizer is a
    stand-in that only carries the pad token the Embedder asks decoders for."""
    from kalm_fast.model import Embedder

    return Embedder(model, types.SimpleNamespace(pad_token="<pad>", eos_token="<pad>"))


def kalm_fast_pipeline(embedder, batch: Batch, device, chunk_tokens: int) -> Callable[[], torch.Tensor]:
    """The trainer's own GradCache (kalm_fast.train.step.grad_cache) on token-budget chunks."""
    from kalm_fast.train.step import grad_cache

    chunks = [dict(zip(("input_ids", "attention_mask"), batch.padded(start, stop, device)))
              for start, stop in _chunks(batch.lengths, chunk_tokens)]

    def loss_fn(q, d):
        return ops.focal_infonce(q, d, group_size=G, temperature=TEMPERATURE, gamma=GAMMA), None

    def loss_backward():
        loss, _, _ = grad_cache(embedder, chunks, batch.B, loss_fn)
        return loss

    return loss_backward


def st_model(model, size: Size, device, dtype):
    """A SentenceTransformer (Transformer + mean Pooling) holding a copy of ``model``'s weights, bidirectional."""
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="kalm-bench-st-") as folder:
        model.save_pretrained(folder)
        # token ids go straight to the model: a one-token tokenizer only satisfies the Transformer module's loader
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                      pad_token="<pad>")
        tok.save_pretrained(folder)
        transformer = Transformer(folder, model_kwargs={"attn_implementation": "sdpa", "dtype": dtype})
    transformer.auto_model.config.is_causal = False
    st = SentenceTransformer(modules=[transformer, Pooling(size.config["hidden_size"], "mean")], device=str(device))
    return st.to(dtype=dtype).train()


def st_cached_mnrl_pipeline(st, batch: Batch, device, chunk_tokens: int) -> Callable[[], torch.Tensor]:
    """sentence-transformers' CachedMultipleNegativesRankingLoss on the columns (anchor, positive, negatives...)."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    loss_mod = CachedMultipleNegativesRankingLoss(st, scale=1 / TEMPERATURE, mini_batch_size=batch.B * G + batch.B,
                                                  mini_batch_num_tokens=chunk_tokens)
    B = batch.B
    offsets = [sum(batch.lengths[:i]) for i in range(len(batch.lengths))]

    def column(indices):
        lengths = [batch.lengths[i] for i in indices]
        ids = torch.zeros(len(indices), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(indices):
            ids[r, :lengths[r]] = batch.ids[offsets[i]:offsets[i] + lengths[r]]
            mask[r, :lengths[r]] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    features = [column(range(B))] + [column([B + i * G + j for i in range(B)]) for j in range(G)]
    labels = torch.zeros(B, dtype=torch.long, device=device)
    _check_st(st, loss_mod, features, labels, batch, device)

    def loss_backward():
        loss = loss_mod([dict(f) for f in features], labels)
        loss.backward()
        return loss.detach()

    return loss_backward


def _check_st(st, loss_mod, features, labels, batch: Batch, device) -> None:
    """Before st_cached_mnrl is timed: its embeddings equal hf_sdpa's (same weights, both bidirectional, mean pool,
    normalized) and its loss equals the reference InfoNCE (gamma = 0) on them, or it is not the same computation."""
    B = batch.B
    with torch.no_grad():
        emb = [F.normalize(st(dict(f))["sentence_embedding"].float(), dim=-1) for f in features]
        q = emb[0]
        docs = torch.stack(emb[1:], dim=1).reshape(B * G, -1)  # document i*G + j is column j+1's row i
        hidden = st[0].auto_model(**features[0], use_cache=False, is_causal=False).last_hidden_state.float()
        m = features[0]["attention_mask"].to(hidden.dtype)[..., None]
        q_hf = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        want = reference.focal_infonce(q, docs, _pos_idx(B, device), G, True, TEMPERATURE, 0.0)
        got = loss_mod.loss([dict(f) for f in features], labels)
    tol = 1e-4 if q.dtype == torch.float32 and st[0].auto_model.dtype == torch.float32 else 3e-2
    emb_err = (q - q_hf).abs().max().item()
    loss_err = abs(got.item() - want.item()) / max(1.0, abs(want.item()))
    if emb_err > tol or loss_err > tol:
        raise AssertionError(f"st_cached_mnrl differs from the reference: embeddings by {emb_err:.2e}, "
                             f"loss {got.item():.6f} vs {want.item():.6f}")


def make_step(provider: str, module, batch: Batch, device, size: Size, optimizer) -> Callable[[], torch.Tensor]:
    """One training step of ``provider`` on ``batch``: forward, loss, backward, AdamW, gradients freed -> loss."""
    if provider == "kalm_fast":
        loss_backward = kalm_fast_pipeline(module, batch, device, size.chunk_tokens)
    elif provider == "st_cached_mnrl":
        loss_backward = st_cached_mnrl_pipeline(module, batch, device, size.chunk_tokens)
    elif provider == "hf_sdpa":
        loss_backward = hf_sdpa_pipeline(module, batch, device)
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step():
        loss = loss_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def _free(device, optimizer=None):
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)  # an out-of-memory backward leaves some gradients behind
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest B <= cap with fits(B) (0 if not even 1), assuming fits is monotone: doubling from 1, then
    bisection until the bracket is within 1/16 of its lower end."""
    if cap < 1 or not fits(1):
        return 0
    lo = 1
    while lo < cap:
        nxt = min(2 * lo, cap)
        if not fits(nxt):
            hi = nxt
            break
        lo = nxt
    else:
        return lo
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Setup:
    provider: str
    module: torch.nn.Module  # what the pipeline calls: the Embedder, or the transformers model
    optimizer: torch.optim.Optimizer


def _setup(provider: str, size: Size, device, dtype) -> Setup:
    model = build_model(size, device, dtype)
    if provider == "st_cached_mnrl":
        model = module = st_model(model, size, device, dtype)
    else:
        module = kalm_fast_embedder(model) if provider == "kalm_fast" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=_cuda(device))
    return Setup(provider, module, optimizer)


def _shape(batch: Batch) -> str:
    return f"B={batch.B} G={G} seqs={len(batch.lengths)} tokens={batch.tokens} padded={batch.padded_tokens()}"


def _provider_note(provider: str, batch: Batch, size: Size, device) -> str:
    if provider == "kalm_fast":
        n = len(_chunks(batch.lengths, size.chunk_tokens))
        path = "triton" if ops.use_triton(torch.empty(0, device=device)) else "torch path"
        return f"varlen + fused pool + fused loss ({path}), GradCache {n} chunk(s) of <= {size.chunk_tokens} tokens"
    if provider == "st_cached_mnrl":
        import sentence_transformers

        return (f"sentence-transformers {sentence_transformers.__version__} CachedMultipleNegativesRankingLoss "
                f"(GradCache, mini-batches of <= {size.chunk_tokens} tokens), SDPA on padded columns, mean pool, "
                "InfoNCE gamma 0")
    return "SDPA on padded batches, torch pool + naive loss, full-batch backward"


def _step_row(s: Setup, batch: Batch, size: Size, device, dtype, smoke: bool) -> dict:
    step = make_step(s.provider, s.module, batch, device, size, s.optimizer)
    warmup, rep = (1, 3) if smoke or not _cuda(device) else (2, 10)
    times = common.bench_ms(step, device, warmup=warmup, rep=rep)
    peak = common.peak_memory_mb(step, device)
    note = f"{size.name}; {_provider_note(s.provider, batch, size, device)}"
    if not _cuda(device):  # a shared CPU: the load the figure was taken under
        note += f"; load avg {os.getloadavg()[0]:.2f}"
    return common.row(SUITE, OP, s.provider, "step", _shape(batch), dtype, device, times, peak_mem_mb=peak,
                      tokens_per_s=batch.tokens / (times[0] * 1e-3), note=note)


def _step_row_fitting(s: Setup, B: int, size: Size, device, dtype, smoke: bool) -> tuple[dict, int]:
    """The "step" row at B; when hf_sdpa runs out of memory B is halved (kalm_fast then runs at the returned B)."""
    while True:
        batch = make_batch(B, size)
        try:
            return _step_row(s, batch, size, device, dtype, smoke), B
        except Exception as error:  # out of memory, or anything else: reported, not dropped
            if not (_is_oom(error) and s.provider == "hf_sdpa" and B > 1):
                return common.failed_row(SUITE, OP, s.provider, "step", _shape(batch), dtype, device, error), B
        _free(device, s.optimizer)
        B //= 2


def _max_batch_row(s: Setup, size: Size, device, dtype, cap: int, cap_note: str) -> dict:
    probes: dict[int, tuple[Batch, float, float]] = {}  # B -> (batch, ms, peak MB) of the probes that fit

    def fits(B: int) -> bool:
        if common.out_of_time():  # --budget-s spent: no partial answer (a lower bound would read as the maximum)
            raise TimeoutError
        batch = make_batch(B, size)
        try:
            step = make_step(s.provider, s.module, batch, device, size, s.optimizer)
            common.sync(device)
            t0 = time.perf_counter()
            peak = common.peak_memory_mb(step, device)
            probes[B] = (batch, (time.perf_counter() - t0) * 1e3, peak)
            return True
        except Exception as error:  # only out of memory means "does not fit"
            if not _is_oom(error):
                raise
        _free(device, s.optimizer)  # outside the except block: its traceback no longer pins the tensors
        return False

    try:
        best = largest_fitting(fits, cap)
    except TimeoutError:
        _free(device, s.optimizer)
        return common.budget_row(SUITE, OP, [f"{s.provider} max_batch (search cut at B={max(probes, default=0)})"],
                                 dtype, device)
    _free(device, s.optimizer)
    if best == 0:
        r = common.failed_row(SUITE, OP, s.provider, "max_batch", f"B<={cap} G={G}", dtype, device,
                              torch.OutOfMemoryError("B=1 does not fit"))
        r["max_batch"] = 0
        return r
    batch, ms, peak = probes[best]
    reached = " (reached the cap: the real maximum is higher)" if best == cap else ""
    note = f"{size.name}; largest B that fits, cap {cap}{reached}; {cap_note}; time, tokens/s, memory: one step"
    return common.row(SUITE, OP, s.provider, "max_batch", _shape(batch), dtype, device, (ms, ms, ms),
                      peak_mem_mb=peak, tokens_per_s=batch.tokens / (ms * 1e-3), max_batch=best, note=note)


def _memory_note(device, smoke: bool) -> str:
    if smoke:
        return "smoke cap: exercises the search only"
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    return f"{total:.0f} GiB device"


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(*, smoke: bool, device: str) -> list[dict]:
    # the smoke model's CPU ops are tiny: intra-op threads only add synchronization (10-100x slower on a busy CPU)
    with _threads(1 if smoke and not _cuda(device) else None):
        return _run(smoke, device)


def _run(smoke: bool, device: str) -> list[dict]:
    size = SMOKE if smoke else (GPU if _cuda(device) else CPU)
    dtype = torch.bfloat16 if _cuda(device) and not smoke else torch.float32
    search = smoke or _cuda(device)
    _free(device)
    step_rows, batch_rows = {}, {}
    step_B, hf_max = size.step_batch, 0
    skipped: list[dict] = []  # what a --budget-s run had no time for
    for provider in common.within_budget(SUITE, OP, list(PROVIDERS), str, dtype, device, skipped):
        missing = _missing(provider)
        if missing:
            step_rows[provider] = common.failed_row(SUITE, OP, provider, "step", f"B={step_B} G={G}", dtype, device,
                                                    ImportError(missing))
            continue
        s = _setup(provider, size, device, dtype)
        step_rows[provider], step_B = _step_row_fitting(s, step_B, size, device, dtype, smoke)
        _free(device, s.optimizer)
        if search:  # the search checks the --budget-s deadline before each probe (_max_batch_row)
            if smoke:
                cap = SMOKE_CAP
            elif provider != "hf_sdpa":
                cap = min(MAX_BATCH_CAP, CAP_OVER_BASELINE * max(hf_max, 1))
            else:
                cap = MAX_BATCH_CAP
            try:
                batch_rows[provider] = _max_batch_row(s, size, device, dtype, cap, _memory_note(device, smoke))
            except Exception as error:  # anything but out of memory: reported, not dropped
                batch_rows[provider] = common.failed_row(SUITE, OP, provider, "max_batch", f"B<={cap} G={G}",
                                                         dtype, device, error)
            if provider == "hf_sdpa":
                hf_max = batch_rows[provider].get("max_batch") or 0
        del s
        _free(device)
    _note_ratios(step_rows, batch_rows)
    return ([step_rows[p] for p in PROVIDERS if p in step_rows] + [batch_rows[p] for p in PROVIDERS if p in batch_rows]
            + skipped)


def _missing(provider: str) -> str:
    """Why a peer provider cannot run here ("" when it can)."""
    if provider != "st_cached_mnrl":
        return ""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        return f"skipped, sentence-transformers is not importable ({e})"
    return ""


def _note_ratios(step_rows: dict, batch_rows: dict) -> None:
    """Append kalm_fast's ratios over hf_sdpa to its rows (targets: >= 2x tokens/s, >= 4x max batch)."""
    kalm, hf = step_rows.get("kalm_fast"), step_rows.get("hf_sdpa")
    if kalm and hf and kalm.get("tokens_per_s") and hf.get("tokens_per_s"):
        kalm["note"] += f"; {kalm['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s vs hf_sdpa"
    st = step_rows.get("st_cached_mnrl")
    if kalm and st and kalm.get("tokens_per_s") and st.get("tokens_per_s"):
        kalm["note"] += f", {kalm['tokens_per_s'] / st['tokens_per_s']:.2f}x vs st_cached_mnrl"
    kalm, hf = batch_rows.get("kalm_fast"), batch_rows.get("hf_sdpa")
    if kalm and hf and kalm.get("max_batch") and hf.get("max_batch"):
        kalm["note"] += f"; {kalm['max_batch'] / hf['max_batch']:.1f}x max batch vs hf_sdpa"


def main(argv=None) -> None:
    args = common.standard_args(__doc__.splitlines()[0]).parse_args(argv)
    common.report(run(smoke=args.smoke, device=args.device), args.device, stem=SUITE, write=not args.no_write)


if __name__ == "__main__":
    main()
