"""Model glue (SPEC 5): the "kalm_fast" attention for transformers and the padding-free ``Embedder``.

``register()`` adds an attention function and a mask function named "kalm_fast" to transformers
(``AttentionInterface`` and ``AttentionMaskInterface``; without the mask function transformers would silently pass
``attention_mask=None`` and padded batches would attend to padding). The attention is bidirectional by design: a
causal request raises instead of silently running bidirectional. It accepts three layouts:

- packed (padding-free): batch 1 with ``cu_seq_lens_q/k`` and ``max_length_q/k`` -> straight to the varlen kernel,
  no host sync (the path the Embedder uses);
- padded: the (B, S) key-padding mask made by the mask function -> unpad once per forward, varlen, pad;
- no mask: every row is one sequence, except a single row whose ``position_ids`` restart, which is split into the
  packed sequences they mark (as transformers' flash-attention path does; one host sync per layer).

``Embedder`` wraps a Hugging Face backbone (BERT-like encoders; Qwen2/Qwen3/Llama/Mistral decoders made bidirectional
with ``config.is_causal = False``): the batch is unpadded once into one packed sequence (position ids restart per
sequence, ``use_cache=False``), every layer runs the varlen attention, and the masked mean pooling is the fused varlen
pooling with the decoder's final RMSNorm folded in (the backbone runs with ``model.norm`` bypassed and the pooling
applies it per token, so the last hidden states are read once). Unpadding costs the forward's only host syncs
(nonzero and the longest length). Decisions worth knowing:

- Attention dropout is not supported (the kernels have none): the Embedder sets ``attention_dropout`` /
  ``attention_probs_dropout_prob`` to 0 in the config (also in saved folders) and in the attention modules; hidden
  dropout (BERT's 0.1) is kept. Embedding fine-tuning of decoders uses attention dropout 0 anyway.
- ``include_prompt`` (sentence-transformers' Pooling option, same default True): whether ``tokenize(..., prompt=)``
  pools the prompt's tokens. With False the pooling mask leaves them out (they are still attended to): the leading
  tokens that equal the prompt tokenized alone (for BERT [CLS] + prompt, as sentence-transformers' prompt length).
- ``bidirectional=False`` (decoders only) keeps the model causal; the kalm_fast attention cannot run it, so that
  mode uses transformers' SDPA on the padded batch and the fused padded pooling.
- The Embedder starts in the backbone's mode (``from_pretrained`` gives eval mode); ``encode`` runs in eval mode and
  restores the previous one.
- ``max_length`` is the Embedder's own truncation length; ``from_pretrained`` does not read a folder's
  sentence_bert_config.json (pass ``max_length=`` to match a sentence-transformers model's ``max_seq_length``).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from kalm_fast import ops
from kalm_fast.atomic import write_json
from kalm_fast.padding import pad_input, varlen_layout

__all__ = ["ATTN_IMPLEMENTATION", "QUERY_PROMPT", "query_prompt", "register", "kalm_fast_attention", "kalm_fast_mask",
           "Embedder"]

ATTN_IMPLEMENTATION = "kalm_fast"
QUERY_PROMPT = "Instruct: {instruction} \n Query: "  # SPEC 5 / KaLM-Embedding-V2: queries get it, documents none
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # final norm model.norm = RMSNorm(weight, variance_epsilon)
ENCODER_TYPES = ("bert",)  # absolute positions from position_ids, last layer ends in LayerNorm
_DROPOUT_FIELDS = ("attention_dropout", "attention_probs_dropout_prob")


# ----------------------------------------------------------------------------------------------------------------
# transformers hooks
# ----------------------------------------------------------------------------------------------------------------


def register() -> str:
    """Register the "kalm_fast" attention and mask functions with transformers (idempotent). Returns the name to
    pass as ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kalm_fast_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kalm_fast_mask)
    return ATTN_IMPLEMENTATION


# The mask function builds the padded layout once per forward; every layer receives the same mask object and reuses
# it. Keyed by identity through a weak reference: a miss only recomputes, it can never hand over a stale layout.
_layout_cache: tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor, int]] | None = None


def _cached_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    global _layout_cache
    if _layout_cache is not None and _layout_cache[0]() is mask:
        return _layout_cache[1]
    layout = varlen_layout(mask)
    _layout_cache = (weakref.ref(mask), layout)
    return layout


def kalm_fast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, use_vmap: bool = False, **kwargs):
    """``AttentionMaskInterface`` entry: returns the (B, S) bool key-padding mask (true = real token), or None.

    Causality is checked by the attention function (it sees ``is_causal``). Refused here: custom or/and mask
    overlays (``use_vmap``) and a KV cache or prefix (queries and keys must be the same tokens).
    """
    if use_vmap:
        raise ValueError("the kalm_fast attention supports a key-padding mask only, not custom or/and mask functions")
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)) or q_offset or kv_offset \
            or q_length != kv_length:
        raise ValueError(f"the kalm_fast attention is self-attention without a KV cache, got q_length={q_length}, "
                         f"kv_length={kv_length}, offsets {q_offset}/{kv_offset} (pass use_cache=False)")
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    _cached_layout(mask)
    return mask


def _position_ids_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Packed sequences marked by position ids (1, T): a sequence starts wherever the position does not grow by 1
    (transformers' convention). Returns cu_seqlens int32 and max_seqlen (one host sync)."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    bounds = torch.nonzero(F.pad(starts, (0, 1), value=True)).flatten().to(torch.int32)  # starts + [T]
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def kalm_fast_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                        is_causal: bool | None = None, sliding_window: int | None = None, softcap=None,
                        cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                        max_length_q: int | None = None, max_length_k: int | None = None,
                        position_ids: torch.Tensor | None = None, **kwargs):
    """``AttentionInterface`` entry. query (B, Hq, Q, D), key/value (B, Hkv, K, D) (GQA not repeated) ->
    (out (B, Q, Hq, D), None). Bidirectional attention inside each sequence; layouts in the module docstring."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal:
        raise ValueError(f"{type(module).__name__} requested causal attention, but the kalm_fast attention is "
                         "bidirectional only: make the model bidirectional (config.is_causal = False or "
                         "model(..., is_causal=False)) or use another attn_implementation")
    if dropout:
        raise ValueError(f"the kalm_fast attention has no attention dropout, got dropout={dropout}: set the config's "
                         "attention dropout (attention_dropout / attention_probs_dropout_prob) to 0")
    if softcap:
        raise ValueError("the kalm_fast attention does not support logit soft-capping")
    B, Hq, Q, D = query.shape
    if key.shape[2] != Q:
        raise ValueError(f"the kalm_fast attention is self-attention without a KV cache: {Q} queries, "
                         f"{key.shape[2]} keys (pass use_cache=False)")
    # (B, H, S, D) -> (B*S, H, D) token-major, the varlen layout (a strided view for B = 1: the kernels only need
    # unit stride along D)
    q, k, v = (x.transpose(1, 2).reshape(B * Q, x.shape[1], D) for x in (query, key, value))

    if cu_seq_lens_q is not None:  # packed: trust the caller's layout, no host sync
        if B != 1:
            raise ValueError(f"packed inputs (cu_seq_lens_q) need batch size 1, got {B}")
        if cu_seq_lens_k is not None and cu_seq_lens_k.shape != cu_seq_lens_q.shape:
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
        if max_length_q is None:
            raise ValueError("packed inputs need max_length_q with cu_seq_lens_q")
        # a collator may leave cu_seq_lens on the host: the kernels read it on the query's device
        cu_seqlens = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        max_seqlen = int(max_length_q)
        indices = None
    elif attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (B, Q):
            raise ValueError(f"the kalm_fast attention takes a (B, S) = ({B}, {Q}) key-padding mask, got shape "
                             f"{tuple(attention_mask.shape)} (4-D masks are not supported)")
        indices, cu_seqlens, max_seqlen = _cached_layout(attention_mask)
        q, k, v = (x.index_select(0, indices) for x in (q, k, v))
    elif B == 1 and position_ids is not None:
        cu_seqlens, max_seqlen = _position_ids_layout(position_ids)
        indices = None
    else:
        cu_seqlens = torch.arange(0, (B + 1) * Q, Q, dtype=torch.int32, device=query.device)
        max_seqlen, indices = Q, None
    if sliding_window is not None and max_seqlen > sliding_window:
        raise ValueError(f"sequences of {max_seqlen} tokens exceed the model's sliding window ({sliding_window}); "
                         "the kalm_fast attention computes full attention only")

    # Under autocast v comes out of a Linear in the autocast dtype while RoPE's fp32 cos/sin upcast q and k: run the
    # kernel in v's dtype then. The op sets its own precision (fp32 accumulation), so autocast must not recast the
    # torch path's matmuls either.
    if torch.is_autocast_enabled(query.device.type) and (q.dtype != v.dtype or k.dtype != v.dtype):
        q, k = q.to(v.dtype), k.to(v.dtype)
    with torch.autocast(query.device.type, enabled=False):
        out = ops.flash_attn_varlen_unchecked(q, k, v, cu_seqlens, max_seqlen, scaling)
    if indices is not None:
        return pad_input(out, indices, B, Q), None
    return out.reshape(B, Q, Hq, D), None


# ----------------------------------------------------------------------------------------------------------------
# Embedder
# ----------------------------------------------------------------------------------------------------------------


def query_prompt(instruction: str | None) -> str | None:
    """The prompt a query with this instruction gets (None without an instruction)."""
    return None if not instruction else QUERY_PROMPT.format(instruction=instruction)



def _check_mrl_dims(mrl_dims, embed_dim: int) -> list[int] | None:
    """Matryoshka dims: distinct positive ints <= embed_dim, given ascending or descending; stored descending."""
    if mrl_dims is None:
        return None
    dims = list(mrl_dims)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"mrl_dims must be a non-empty list of ints, got {mrl_dims!r}")
    if min(dims) < 1 or max(dims) > embed_dim:
        raise ValueError(f"mrl_dims must lie in [1, embed_dim={embed_dim}], got {dims}")
    if len(set(dims)) != len(dims) or dims not in (sorted(dims), sorted(dims, reverse=True)):
        raise ValueError(f"mrl_dims must be distinct and sorted (ascending or descending), got {dims}")
    return sorted(dims, reverse=True)


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16") else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16 (or their names), "
                         f"got {dtype!r}")
    return dtype


class Embedder(torch.nn.Module):
    """Text embedder on a Hugging Face backbone: padding-free forward, fused mean pooling, L2 normalize.

    Build it with ``Embedder.from_pretrained(path, ...)``, or wrap a loaded ``model`` (a base model such as
    ``AutoModel``'s; heads are dropped) and its ``tokenizer`` with ``Embedder(model, tokenizer, ...)``, which
    prepares the model in place (attention implementation, causality, attention dropout 0).

    Arguments:
        model: a transformers ``PreTrainedModel`` of a type in DECODER_TYPES (llama, mistral, qwen2, qwen3) or
            ENCODER_TYPES (bert); its ``base_model`` is kept.
        tokenizer: the model's tokenizer (any padding side).
        bidirectional: decoders attend to the whole sequence (an encoder, the recipe's default); False keeps them
            causal. Encoders are always bidirectional.
        pooling: "mean" (masked mean over the non-prompt tokens, fused with the final norm).
        normalize: L2-normalize the embeddings (and again after a Matryoshka cut).
        mrl_dims: the Matryoshka dims ``encode(dim=)`` accepts: distinct, sorted, each in [1, hidden size]
            (None: any dim).
        max_length: truncation length in tokens (encoders: at most the model's absolute positions).
        include_prompt: pool the prompt's tokens too (False: only the text's).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, *, bidirectional: bool = True, pooling: str = "mean",
                 normalize: bool = True, mrl_dims: list[int] | None = None, max_length: int = 512,
                 include_prompt: bool = True):
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        model = model.base_model
        model_type = model.config.model_type
        if model_type not in DECODER_TYPES + ENCODER_TYPES:
            raise ValueError(f"model type {model_type!r} is not supported: decoders {DECODER_TYPES}, "
                             f"encoders {ENCODER_TYPES}")
        if pooling != "mean":
            raise ValueError(f"pooling must be 'mean' (the masked mean pooling kalm_fast fuses), got {pooling!r}")
        self.is_decoder = model_type in DECODER_TYPES
        if not bidirectional and not self.is_decoder:
            raise ValueError(f"bidirectional=False applies to decoders only; {model_type!r} is a bidirectional "
                             "encoder")
        self.max_length = _check_positive_int("max_length", max_length)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if not self.is_decoder and max_positions is not None and max_length > max_positions:
            raise ValueError(f"max_length={max_length} exceeds the model's {max_positions} absolute positions")

        self.model = model
        self.tokenizer = tokenizer
        self.bidirectional = bool(bidirectional)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.include_prompt = bool(include_prompt)
        self._prompt_ids: dict[str, list[int]] = {}
        self.embed_dim = int(model.config.hidden_size)
        self.mrl_dims = _check_mrl_dims(mrl_dims, self.embed_dim)

        if self.is_decoder:
            norm = getattr(model, "norm", None)
            if norm is None or not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
                raise ValueError(f"{type(model).__name__} has no final RMSNorm at model.norm to fold into pooling")
            if tokenizer.pad_token is None:  # Llama/Mistral tokenizers: any id works, padding is removed anyway
                if tokenizer.eos_token is None:
                    raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
                tokenizer.pad_token = tokenizer.eos_token
        self.train(model.training)  # follow the backbone (from_pretrained gives eval mode), not nn.Module's default
        _zero_attention_dropout(model)
        if self.bidirectional:
            if self.is_decoder:
                model.config.is_causal = False
            model.set_attn_implementation(register())
        else:
            model.set_attn_implementation("sdpa")

    @classmethod
    def from_pretrained(cls, path, *, bidirectional: bool = True, pooling: str = "mean", normalize: bool = True,
                        mrl_dims: list[int] | None = None, dtype=None, device=None, max_length: int = 512,
                        include_prompt: bool = True) -> Embedder:
        """Load a Hugging Face folder (or hub id) as an Embedder.

        dtype: torch.float32/float16/bfloat16 (or its name) or None (transformers' default: the checkpoint's dtype);
        device: where to put the model (default CPU); max_length: truncation length in tokens (a folder's
        sentence_bert_config.json is not read). Other arguments as in ``__init__``, which prepares the model.
        """
        path = os.fspath(path)
        # absolute, ./ or ~ paths and paths with more than one "/" are local (hub ids are "name" or "org/name")
        local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
        if local and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"path {path!r} is not a model folder")
        dtype = _check_dtype(dtype)
        model = AutoModel.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
        if device is not None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, bidirectional=bidirectional, pooling=pooling, normalize=normalize,
                   mrl_dims=mrl_dims, max_length=max_length, include_prompt=include_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenization ---------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], *, prompt: str | None = None, max_length: int | None = None) -> dict:
        """Padded batch of ``prompt + text``: input_ids, attention_mask (B, S) and pool_mask (B, S) = attention_mask,
        without the prompt's tokens when ``include_prompt`` is False. Truncates to ``max_length`` (default
        self.max_length)."""
        texts = _check_texts(texts)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}")
            texts = [prompt + t for t in texts]
        max_length = self.max_length if max_length is None else _check_positive_int("max_length", max_length)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        mask = enc["attention_mask"]
        pool_mask = mask.clone()
        if prompt and not self.include_prompt:
            self._unpool_prompt(pool_mask, enc["input_ids"], mask, prompt)
        return {"input_ids": enc["input_ids"], "attention_mask": mask, "pool_mask": pool_mask}

    def _unpool_prompt(self, pool_mask, input_ids, mask, prompt: str) -> None:
        """Zero ``pool_mask`` on each row's prompt tokens: the longest run of its first real tokens equal to the
        prompt tokenized alone (so a BPE token that merges the prompt's last space with the text's first word, or
        the [SEP] that ends the prompt alone, stays pooled), whatever the padding side."""
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = self.tokenizer(prompt)["input_ids"]
        ids = self._prompt_ids[prompt]
        for b in range(input_ids.shape[0]):
            positions = mask[b].nonzero().flatten()[: len(ids)]
            head = input_ids[b, positions].tolist()
            n = next((i for i, (x, y) in enumerate(zip(head, ids)) if x != y), len(head))
            pool_mask[b, positions[:n]] = 0

    # -- forward --------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _final_norm_bypassed(self):
        """Run the backbone without what the embedding does not take from it: a decoder's final norm (the pooling
        applies it; yielded) and an encoder's pooler (the [CLS] projection, never used: under torch.compile its
        parameters would get zero gradients instead of none, which AdamW's weight decay then moves). Both are
        restored afterwards, so ``self.model`` and its saved weights keep them."""
        if not self.is_decoder:
            pooler = getattr(self.model, "pooler", None)
            if pooler is None:
                yield None
                return
            self.model.pooler = None
            try:
                yield None
            finally:
                self.model.pooler = pooler
            return
        norm = self.model.norm
        self.model.norm = torch.nn.Identity()
        try:
            yield norm
        finally:
            self.model.norm = norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, S) (any padding side), pool_mask (B, S) or None (= attention_mask; tokens
        pooled = pool_mask & attention_mask) -> (B, embed_dim) embeddings in the hidden states' dtype, L2-normalized
        when ``normalize``. A row without a pooled token gives zeros. Differentiable."""
        self._check_batch(input_ids, attention_mask, pool_mask)
        if not self.bidirectional:
            return self._forward_causal(input_ids, attention_mask, pool_mask)
        indices, cu_seqlens, max_seqlen = varlen_layout(attention_mask)
        if indices.numel() == 0:
            raise ValueError("attention_mask has no real token")
        mask = attention_mask.bool()
        # position of each real token within its own sequence (restarts at 0; left or right padding alike)
        positions = (mask.cumsum(dim=1) - 1).flatten().index_select(0, indices)
        kwargs = dict(position_ids=positions[None], use_cache=False, cu_seq_lens_q=cu_seqlens,
                      cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
        if self.is_decoder:
            kwargs["is_causal"] = False
        with self._final_norm_bypassed() as norm:
            hidden = self.model(input_ids=input_ids.flatten().index_select(0, indices)[None], attention_mask=None,
                                **kwargs).last_hidden_state[0]  # (T, H)
        token_mask = None if pool_mask is None else pool_mask.bool().flatten().index_select(0, indices)
        return ops.varlen_mean_pool_unchecked(hidden, cu_seqlens, token_mask, **self._norm_args(norm),
                                              normalize=self.normalize)

    def _forward_causal(self, input_ids, attention_mask, pool_mask):
        """bidirectional=False: transformers' SDPA on the padded batch, then the fused padded pooling."""
        mask = attention_mask.bool()
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        with self._final_norm_bypassed() as norm:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                use_cache=False).last_hidden_state
        pooled = mask if pool_mask is None else mask & pool_mask.bool()
        return ops.masked_mean_pool(hidden, pooled, **self._norm_args(norm), normalize=self.normalize)

    @staticmethod
    def _norm_args(norm) -> dict:
        if norm is None:  # BERT-like: the last layer already ends in its LayerNorm
            return {}
        return {"norm": "rmsnorm", "norm_weight": norm.weight, "eps": float(norm.variance_epsilon)}

    def _check_batch(self, input_ids, attention_mask, pool_mask):
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pool_mask is not None:
            tensors["pool_mask"] = pool_mask
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape != input_ids.shape:
                raise ValueError(f"{name} must be (B, S) like input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the model's device {self.device}, got {t.device}")
        if input_ids.shape[0] == 0:
            raise ValueError("the batch is empty")

    # -- encode ---------------------------------------------------------------------------------------------------

    def encode(self, texts: list[str], *, prompt: str | None = None, batch_size: int = 32,
               max_length: int | None = None, dim: int | None = None, show_progress_bar: bool = False
               ) -> torch.Tensor:
        """Embed ``texts`` -> (len(texts), dim or embed_dim) float32 on CPU, in input order.

        Texts are sorted longest first (by characters) and batched, so batches hold similar lengths and the largest
        one comes first; runs in eval mode under ``torch.inference_mode`` (the training mode is restored). ``dim``
        keeps the first ``dim`` coordinates (Matryoshka; one of ``mrl_dims`` when those are set) and
        re-normalizes when ``normalize``.
        """
        texts = _check_texts(texts)
        batch_size = _check_positive_int("batch_size", batch_size)
        out_dim = self.embed_dim if dim is None else self._check_dim(dim)
        result = torch.empty(len(texts), out_dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch",
                                  disable=not show_progress_bar):
                    idx = order[start : start + batch_size]
                    batch = self.tokenize([texts[i] for i in idx], prompt=prompt, max_length=max_length)
                    batch = {name: t.to(self.device) for name, t in batch.items()}
                    emb = self(batch["input_ids"], batch["attention_mask"], batch["pool_mask"]).float()
                    if out_dim != self.embed_dim:
                        emb = emb[:, :out_dim]
                        if self.normalize:
                            emb = F.normalize(emb, dim=-1)
                    result[torch.tensor(idx)] = emb.cpu()
        finally:
            self.train(was_training)
        return result

    def _check_dim(self, dim) -> int:
        dim = _check_positive_int("dim", dim)
        allowed = self.mrl_dims + [self.embed_dim] if self.mrl_dims else None
        if dim > self.embed_dim or (allowed is not None and dim not in allowed):
            raise ValueError(f"dim must be {'one of ' + str(sorted(set(allowed))) if allowed else '<= embed_dim'} "
                             f"(embed_dim={self.embed_dim}), got {dim}")
        return dim

    # -- training helpers -----------------------------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing of the backbone's layers (non-reentrant by default)."""
        # newer transformers name it activation_checkpointing_enable and deprecate the old name; older ones (the
        # GPU machine's 5.17) may only have the old one
        enable = getattr(self.model, "activation_checkpointing_enable", None) \
            or self.model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None) \
            or self.model.gradient_checkpointing_disable
        disable()

    # -- saving ---------------------------------------------------------------------------------------------------

    def save_pretrained(self, path) -> None:
        """Write a folder that ``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load
        as-is: the backbone (final norm included; ``is_causal: false`` for bidirectional decoders), the tokenizer,
        and sentence-transformers' modules.json, sentence_bert_config.json, 1_Pooling (mean) and, when
        ``normalize``, the Normalize module."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        pooling = {
            "word_embedding_dimension": self.embed_dim,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "include_prompt": self.include_prompt,
        }
        _write_json(path / "modules.json", modules)
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
        _write_json(path / "1_Pooling" / "config.json", pooling)
        _write_json(path / "config_sentence_transformers.json",
                    {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})


def _zero_attention_dropout(model: PreTrainedModel) -> None:
    """Attention dropout 0 in the config (saved folders keep it) and in the built attention modules, which copied
    it at construction: Qwen2/Llama-style ``attention_dropout`` floats, BERT's ``dropout`` module of the
    self-attention (the hidden dropout modules are left alone)."""
    for field in _DROPOUT_FIELDS:
        if getattr(model.config, field, 0.0):
            setattr(model.config, field, 0.0)
    for module in model.modules():
        if not hasattr(module, "is_causal"):  # the attention modules carry is_causal
            continue
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        elif isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = 0.0


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of str (wrap a single text in a list)")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    return texts


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, indent=2)  # atomic: a crash never leaves half a config beside the weights

