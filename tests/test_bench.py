"""The bench harness (SPEC 7): ``python -m bench --smoke`` runs every suite green on CPU, the train-step suite's two
pipelines compute the same step (so its comparison is apples to apples), its max-batch search, and the plots.

Tolerance of the pipeline comparison: fp32 on CPU, the two pipelines differ only in summation order (padded SDPA vs
packed varlen attention, masked sum vs segment pooling, naive vs chunked loss); the logits are cosines / 0.02, so an
ulp-level difference in an embedding is amplified 50x in a logit. Loss: atol = rtol = 1e-4 (measured ~1e-7 relative).
Gradients: 1e-4 of each tensor's largest entry (measured <= 2e-6).
"""

import importlib
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, import_bench

ts = import_bench("bench_train_step")
plots = import_bench("plots")
targets = import_bench("targets")
attention = import_bench("bench_attention")
infonce = import_bench("bench_infonce")
common = import_bench("common")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


HAS_ST = _importable("sentence_transformers")
SUITES = import_bench("__main__").SUITES


@pytest.fixture
def one_thread():
    """The smoke model's ops are tiny: intra-op threads only add synchronization (10-100x slower on a busy CPU)."""
    with ts._threads(1):
        yield


@pytest.mark.slow
def test_bench_smoke_runs_every_suite():
    out = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-write", "--no-plots"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for name in SUITES:
        assert f"=== {name} ===" in out.stdout and f"({name}: " in out.stdout, f"suite {name} did not finish"


def test_budget_run_reports_what_it_left_out(tmp_path):
    """--budget-s (the lent GPU's capped bench step): every suite stops before its next shape once its share is spent
    and lists what it left out in one row; the summary, the targets and the plots take such rows."""
    out = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-write", "--no-plots", "--budget-s", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sections = out.stdout.split("=== ")[1:]
    assert [s.split(" ===")[0] for s in sections] == SUITES
    for section in sections:
        assert "not run: the bench's time budget ran out" in section, section[:400]
    common, main = import_bench("common"), import_bench("__main__")
    all_rows = {}
    common.set_deadline(0)
    try:
        for name in SUITES:
            all_rows[name] = import_bench(f"bench_{name}").run(smoke=True, device="cpu")
    finally:
        common.set_deadline(None)
    assert "time budget ran out" in main.render_summary(all_rows, "cpu", smoke=True)
    plots.write_plots(all_rows, tmp_path)
    common.set_deadline(None)
    assert not common.out_of_time()


def test_soup_writes_no_checkpoints_past_the_budget(monkeypatch):
    """The soup suite's checkpoints (3 x 1 GB at full size) are not written once the budget is spent: one budget row."""
    soup = import_bench("bench_soup")
    monkeypatch.setattr(soup, "generate", lambda *a, **k: pytest.fail("checkpoints written past the budget"))
    common.set_deadline(0)
    try:
        rows = soup.run(smoke=True, device="cpu")
    finally:
        common.set_deadline(None)
    assert len(rows) == 1 and "time budget ran out" in rows[0]["note"], rows


@pytest.mark.parametrize("suite", ["infonce", "pooling"])
def test_budget_is_checked_before_each_provider(monkeypatch, suite):
    """Within a shape the deadline is checked before each provider too (torch.compile, last, takes a minute there):
    once it passes, the shape's remaining providers are one budget row, then the remaining shapes another."""
    calls = []
    monkeypatch.setattr(common, "out_of_time", lambda: calls.append(1) or len(calls) > 2)  # shape, 1st provider
    rows = import_bench(f"bench_{suite}").run(smoke=True, device="cpu")
    budget = [r for r in rows if "time budget ran out" in r["note"]]
    timed = [r for r in rows if r["median_ms"] != "" and r["op"] not in ("matmul", "copy")]
    assert len(budget) == 2 and {r["mode"] for r in timed} == {"fwd", "fwd+bwd"} and len(timed) == 2, rows
    assert budget[0]["shape"].startswith("torch"), budget[0]  # the first shape's other providers
    left = len(import_bench(f"bench_{suite}").SMOKE_SHAPES) - 1
    assert f"({left} left)" in budget[1]["note"] and budget[1]["shape"].startswith("B="), budget[1]  # other shapes


def test_max_batch_search_cut_by_the_budget(monkeypatch, one_thread):
    """A --budget-s deadline inside the train step's max-batch search ends it with a budget row, not with the largest
    B probed so far (a lower bound would read as the maximum in the targets)."""
    s = ts._setup("kalm_fast", ts.SMOKE, "cpu", torch.float32)
    answers = iter([False])  # the first probe (B = 1) runs, the deadline passes before the second
    monkeypatch.setattr(ts.common, "out_of_time", lambda: next(answers, True))
    r = ts._max_batch_row(s, ts.SMOKE, "cpu", torch.float32, 64, "smoke cap")
    assert "time budget ran out" in r["note"] and "search cut at B=1" in r["shape"] and r["max_batch"] == ""


def _two_pipelines(batch, chunk_tokens):
    """The same random weights twice: transformers' SDPA model and the kalm_fast Embedder on its copy."""
    hf = ts.build_model(ts.SMOKE, "cpu", torch.float32)
    kalm = ts.build_model(ts.SMOKE, "cpu", torch.float32)
    embedder = ts.kalm_fast_embedder(kalm)
    return (hf, ts.hf_sdpa_pipeline(hf, batch, "cpu")), (kalm, ts.kalm_fast_pipeline(embedder, batch, "cpu",
                                                                                       chunk_tokens))


@pytest.mark.parametrize("chunk_tokens", [64, 10**6], ids=["gradcache-chunks", "one-chunk"])
def test_train_step_pipelines_compute_the_same_step(chunk_tokens, one_thread):
    batch = ts.make_batch(3, ts.SMOKE, seed=1)
    assert len(set(batch.lengths)) > 3 and batch.padded_tokens() > batch.tokens  # a real length mix, padding
    chunks = len(ts._chunks(batch.lengths, chunk_tokens))
    assert chunks > 2 if chunk_tokens == 64 else chunks == 1
    (hf, hf_step), (kalm, kalm_step) = _two_pipelines(batch, chunk_tokens)
    hf_loss, kalm_loss = hf_step(), kalm_step()
    torch.testing.assert_close(kalm_loss, hf_loss, atol=1e-4, rtol=1e-4)
    kalm_params = dict(kalm.named_parameters())
    for name, p in hf.named_parameters():
        assert p.grad is not None and kalm_params[name].grad is not None, name
        scale = p.grad.abs().max().clamp_min(1e-12)
        err = (kalm_params[name].grad - p.grad).abs().max() / scale
        assert err <= 1e-4, f"{name}: gradient differs by {err:.2e} of its largest entry"


def test_chunks_respect_the_token_budget():
    lengths = [5, 3, 9, 2, 2, 20, 1]
    bounds = ts._chunks(lengths, 10)
    assert bounds == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]  # 20 > budget: a chunk of its own
    assert [i for a, b in bounds for i in range(a, b)] == list(range(len(lengths)))


@pytest.mark.parametrize("limit, cap, expected", [(13, 4096, 13), (0, 64, 0), (1, 64, 1), (64, 64, 64),
                                                  (100, 64, 64), (50, 64, 50), (1000, 4096, 1000)])
def test_largest_fitting(limit, cap, expected):
    probed = []

    def fits(B):
        probed.append(B)
        return limit >= B

    got = ts.largest_fitting(fits, cap)
    assert max(probed) <= cap
    # exact up to the search's 1/16 resolution, and never above what fits
    assert got <= expected and expected - got <= max(1, got // 16)
    assert len(probed) <= 2 * max(cap, 2).bit_length() + 6


def test_train_step_smoke_rows_and_plot(tmp_path):
    threads = torch.get_num_threads()
    rows = ts.run(smoke=True, device="cpu")
    by = {(r["provider"], r["mode"]): r for r in rows}
    providers = ("kalm_fast", "hf_sdpa") + (("st_cached_mnrl",) if HAS_ST else ())
    assert set(by) == {(p, m) for p in providers for m in ("step", "max_batch")}
    for (_, mode), r in by.items():
        assert r["suite"] == "train_step" and r["median_ms"] != "" and r["tokens_per_s"] > 0, r
        if mode == "max_batch":
            assert r["max_batch"] == ts.SMOKE_CAP
    assert by["kalm_fast", "step"]["shape"] == by["hf_sdpa", "step"]["shape"]  # the same batch for both
    assert torch.get_num_threads() == threads  # the smoke's one-thread setting is undone
    paths = plots.write_plots({"train_step": rows}, tmp_path)
    assert tmp_path / "train_step.png" in paths
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_train_step_out_of_memory_is_a_limit_not_a_failure(monkeypatch):
    """hf_sdpa made to run out of memory above B = 1: the step batch is halved for both providers, the max-batch
    search stops at 1 for hf_sdpa and kalm_fast's is unaffected."""
    make_step = ts.make_step

    def oom_above_1(provider, module, batch, *args):
        step = make_step(provider, module, batch, *args)
        if provider != "hf_sdpa" or batch.B == 1:
            return step
        return lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory (simulated)"))

    monkeypatch.setattr(ts, "make_step", oom_above_1)
    rows = ts.run(smoke=True, device="cpu")
    by = {(r["provider"], r["mode"]): r for r in rows}
    for provider in ("hf_sdpa", "kalm_fast"):
        assert by[provider, "step"]["shape"].startswith("B=1 "), by[provider, "step"]
        assert by[provider, "step"]["median_ms"] != ""
    assert by["hf_sdpa", "max_batch"]["max_batch"] == 1
    assert by["kalm_fast", "max_batch"]["max_batch"] == ts.SMOKE_CAP
    assert "4.0x max batch vs hf_sdpa" in by["kalm_fast", "max_batch"]["note"]


@pytest.mark.skipif(not HAS_ST, reason="sentence-transformers is not installed")
def test_st_cached_mnrl_is_checked_against_the_reference(one_thread):
    """The sentence-transformers peer's embeddings equal hf_sdpa's and its loss the reference InfoNCE (gamma 0)
    before it is timed; a model that is not the same (here: causal attention) is refused."""
    batch = ts.make_batch(2, ts.SMOKE, seed=1)
    st = ts.st_model(ts.build_model(ts.SMOKE, "cpu", torch.float32), ts.SMOKE, "cpu", torch.float32)
    ts.st_cached_mnrl_pipeline(st, batch, "cpu", 64)  # checks, raises on a mismatch
    st[0].auto_model.config.is_causal = True
    with pytest.raises(AssertionError, match="differs from the reference"):
        ts.st_cached_mnrl_pipeline(st, batch, "cpu", 64)


def test_peers_that_cannot_run_here_get_a_one_line_reason():
    if not torch.cuda.is_available():
        _, skipped = attention.peers("cpu")
        assert skipped["varlen_attn"] == "skipped, torch's varlen_attn runs on CUDA only"
        assert {"flash-attn", "flash-attn-4"} <= skipped.keys()
        assert infonce.inf_cl_reason("cpu").startswith("skipped, inf")
    assert all("\n" not in why for why in attention.peers("cpu")[1].values())


def test_sdpa_refusal_note_names_the_reasons():
    """On CUDA, SDPA says why a backend refused only in warnings: a header ("... not used because:"), then one
    warning per reason, each ending in "(Triggered internally at <file>:<line>.)". The failed row's note (first
    line, cut at 160 characters) must carry the reasons, not the header and the source location."""
    where = " (Triggered internally at /pytorch/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:{}.)"
    caught = [types.SimpleNamespace(message=UserWarning(m)) for m in (
        "Memory efficient kernel not used because:" + where.format(916),
        "Mem efficient attention requires last dimension of inputs to be divisible by 8." + where.format(167),
        "Flash attention kernel not used because:" + where.format(918),
        "Flash attention does not support non-null attn_mask." + where.format(269),
        "Mem efficient attention requires last dimension of inputs to be divisible by 8." + where.format(167))]
    err = attention._sdpa_refusal("sdpa-efficient", caught, "cuda")
    assert str(err) == ("sdpa-efficient refused: Mem efficient attention requires last dimension of inputs to be "
                        "divisible by 8.; Flash attention does not support non-null attn_mask.")
    note = common.failed_row("attention", "x", "sdpa-efficient", "fwd", "", "bf16", "cpu", err)["note"]
    assert note.endswith("Flash attention does not support non-null attn_mask.")
    none = attention._sdpa_refusal("sdpa-flash", [], "cpu")
    assert str(none) == "sdpa-flash refused: no kernel for this input on cpu"


def test_packed_attention_peer_is_checked_before_timing():
    lengths = [5, 9, 3]
    fwd, inputs, _ = attention.kalm_fast_provider(lengths, 2, 16, torch.float32, "cpu")
    attention._check_packed("kalm_fast", fwd, inputs, lengths)
    with pytest.raises(AssertionError, match="not timed"):
        attention._check_packed("wrong", lambda: fwd() + 1e-2, inputs, lengths)


def _row(suite, provider, op="x", mode="fwd+bwd", shape="", ms=1.0, **kw):
    return {"suite": suite, "op": op, "provider": provider, "mode": mode, "shape": shape, "median_ms": ms,
            "device_name": kw.pop("device_name", "NVIDIA H200"), "note": kw.pop("note", ""), **kw}


def test_targets_judge_against_every_peer():
    soup = [_row("soup", "kalm_fast", "soup_files", ms=2000.0, peak_mem_mb=250, note="RSS target 1031 MB met"),
            _row("soup", "naive-load-all", "soup_files", ms=6000.0),
            _row("soup", "torch-per-tensor", "soup_files", ms=1900.0),
            _row("soup", "mergekit-linear", "soup_files", ms="", note="ImportError: skipped, mergekit ...")]
    _, measured, verdict = targets.check_soup_files({"soup": soup})
    assert verdict == "not met" and "0.95x vs torch-per-tensor" in measured and "mergekit-linear: " in measured
    shape = "uniform-16-512 B=64 T=1 Smax=512 H=16 D=128"
    att = [_row("attention", "kalm_fast", shape=shape, ms=1.0), _row("attention", "varlen_attn", shape=shape, ms=1.1),
           _row("attention", "sdpa-flash", shape=shape, ms=3.0)]
    assert targets.check_attention_varlen_attn({"attention": att})[2] == "met"
    assert targets.check_attention_mixed({"attention": att})[2] == "met"  # 3.0x vs the best SDPA backend
    step = [_row("train_step", p, mode="step", tokens_per_s=t) for p, t in
            (("kalm_fast", 300.0), ("hf_sdpa", 100.0), ("st_cached_mnrl", 200.0))]
    _, measured, verdict = targets.check_train_step({"train_step": step})
    assert verdict == "not met" and "vs st_cached_mnrl: 1.50x tokens/s" in measured
    g0 = [_row("infonce", p, mode="fwd+bwd g0", shape="B=16384 N=131072 D=1024 M=0 gamma=0", ms=ms, peak_mem_mb=1)
          for p, ms in (("kalm_fast", 10.0), ("inf-cl", 20.0))]
    assert targets.check_infonce_vs_inf_cl({"infonce": g0})[2] == "met"


def test_soup_and_train_step_bar_plots(tmp_path):
    rows = [_row("soup", p, "soup_files", shape="3x1MB", ms=ms, peak_mem_mb=mb, dtype="bfloat16")
            for p, ms, mb in (("kalm_fast", 100.0, 230.0), ("torch-per-tensor", 120.0, 900.0))]
    rows.append(_row("soup", "mergekit-linear", "soup_files", shape="3x1MB", ms="", dtype="bfloat16"))
    paths = plots.write_plots({"soup": rows}, tmp_path)
    assert paths == [tmp_path / "soup.png"] and paths[0].stat().st_size > 0


def test_infonce_rows_with_the_cuda_plan_note(monkeypatch):
    """On CUDA each kalm_fast row gets the launch plan in its note; that branch once rebound the suite's row list to
    the plan's config dict, so `python -m bench` on a GPU crashed after the pooling suite. Run here with the CUDA
    branches forced on (timings stubbed: none of them is measured)."""
    monkeypatch.setattr(infonce, "_cuda", lambda device: True)
    monkeypatch.setattr(infonce, "_time", lambda step, device: (1.0, 0.9, 1.1))
    monkeypatch.setattr(infonce, "_peak_mb", lambda *a, **k: 1.0)
    rows = infonce._shape_rows(64, 32, 0, "cpu", True, 100.0)
    assert rows and all(isinstance(r, dict) for r in rows)
    notes = [r["note"] for r in rows if r["provider"] == "kalm_fast"]
    assert notes and all("programs fwd/dq/dd " in n for n in notes), notes


def test_a_broken_suite_is_reported_and_the_others_still_run(monkeypatch, capsys):
    main = import_bench("__main__")
    soup = import_bench("bench_soup")
    good = [_row("soup", "kalm_fast", "soup_files", device="cpu", dtype="bf16")]
    monkeypatch.setattr(infonce, "run", lambda **kw: {"fwd": (64, 64)})  # not a list of rows
    monkeypatch.setattr(soup, "run", lambda **kw: good)
    assert main.main(["--device", "cpu", "--suite", "infonce", "--suite", "soup", "--no-write", "--no-plots"]) == 1
    out, err = capsys.readouterr()
    assert "bench_infonce.run returned dict" in err and "suites that failed: infonce" in err
    assert "=== soup ===" in out and "kalm_fast" in out.split("=== soup ===")[1]


def test_soup_gpu_suite_without_a_cuda_build_is_a_failed_row(monkeypatch):
    """The GPU session builds kalm_fast._C in the background: if that build fails, the soup suite reports a failed
    row beside its file rows instead of losing them."""
    soup = import_bench("bench_soup")
    from kalm_fast import _C

    monkeypatch.setattr(soup, "files_suite", lambda smoke, device: [{"provider": "kalm_fast", "op": "soup_files"}])
    monkeypatch.setattr(soup.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_C, "compiled_with_cuda", False, raising=False)
    monkeypatch.setattr(soup.common, "provenance", lambda device: {"device_name": "a GPU"})  # no CUDA to ask here
    rows = soup.run(smoke=True, device="cuda")
    assert rows[0]["op"] == "soup_files" and len(rows) == 2
    assert rows[1]["median_ms"] == "" and "built without CUDA" in rows[1]["note"]


def test_infonce_target_met_without_peers_only_when_they_ran_out_of_memory():
    """The B=16k target is met with no naive peer timed only when every one of them ran out of memory (the loss
    runs a batch they cannot); a peer that failed otherwise (a compile error) leaves it not measured."""
    shape = "B=16384 N=131072 D=1024 M=2"
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB"
    rows = [_row("infonce", "kalm_fast", shape=shape, ms=90.0),
            _row("infonce", "torch_naive", shape=shape, ms="", note=oom),
            _row("infonce", "torch.compile", shape=shape, ms="", note=oom)]
    assert targets.check_infonce_speed({"infonce": rows})[2] == "met"
    rows[2] = _row("infonce", "torch.compile", shape=shape, ms="", note="BackendCompilerFailed: inductor raised")
    assert targets.check_infonce_speed({"infonce": rows})[2].startswith("not measured: the peers failed")


def test_soup_gpu_target_names_the_failure_on_a_gpu():
    """On a GPU run whose soup GPU suite failed, the verdict names that failure (not "needs the GPU rows")."""
    rows = [_row("soup", "kalm_fast", "soup_files", ms=2000.0),
            _row("soup", "kalm_fast", "accumulate", ms="", note="RuntimeError: kalm_fast._C was built without CUDA")]
    verdict = targets.check_soup_gpu({"soup": rows})[2]
    assert verdict == "not measured: kalm_fast failed (RuntimeError: kalm_fast._C was built without CUDA)"
    cpu = [dict(r, device_name="cpu-x86_64") for r in rows[:1]]
    assert targets.check_soup_gpu({"soup": cpu})[2] == targets.NO_GPU


def test_attention_targets_score_the_autotuned_run_and_say_why_varlen_attn_is_missing():
    """A KALM_FAST_AUTOTUNE=1 run names its provider kalm_fast-autotune; varlen_attn that fails on every shape
    writes one failed row per mode, whose note is the verdict's reason."""
    shape = "long-tail-8k B=8 T=9000 Smax=4096 H=16 D=128"
    att = [_row("attention", "kalm_fast-autotune", shape=shape, ms=1.0),
           _row("attention", "sdpa-flash", shape=shape, ms=2.5),
           _row("attention", "varlen_attn", shape=shape, ms="", note="RuntimeError: no kernel image")]
    measured, verdict = targets.check_attention_mixed({"attention": att})[1:]
    assert verdict == "met" and "2.50x" in measured, measured
    assert targets.check_attention_varlen_attn({"attention": att})[2] == "not measured: RuntimeError: no kernel image"
    results = {r["provider"]: dict(r) for r in att}
    attention._note_speedup(results)
    assert results["kalm_fast-autotune"]["note"] == "2.50x vs best SDPA (sdpa-flash)"


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_an_interrupted_suite_keeps_its_rows(monkeypatch, tmp_path, capsys, how):
    """The GPU session's timeout (SIGTERM) or Ctrl-C inside a suite: the rows it had measured are written with the
    summary, marked, each was printed as it was made, the later suites do not start, and the run exits 130."""
    import os
    import signal
    import time

    main, common = import_bench("__main__"), import_bench("common")
    soup = import_bench("bench_soup")
    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def interrupted(**kw):
        common.row("infonce", "infonce", "kalm_fast", "fwd", "B=1", torch.float32, "cpu", (1.5, 1.0, 2.0))
        common.failed_row("infonce", "infonce", "inf-cl", "fwd", "B=1", torch.float32, "cpu", ImportError("no"))
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(5)  # the handler runs here
        raise AssertionError("the signal did not stop the suite")

    def unhandled(signum, frame):  # stands for the default SIGTERM (which would end pytest) while main does not
        raise RuntimeError("python -m bench left SIGTERM unhandled")

    before = signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(infonce, "run", interrupted)
    monkeypatch.setattr(soup, "run", lambda **kw: pytest.fail("a suite after the interrupted one ran"))
    try:
        assert main.main(["--device", "cpu", "--suite", "infonce", "--suite", "soup", "--no-plots"]) == 130
        assert signal.getsignal(signal.SIGTERM) is unhandled  # main put the handler it found back
    except KeyboardInterrupt:  # not pytest's to see: it would end the whole session
        pytest.fail("python -m bench let the interrupt out of the suite")
    finally:
        signal.signal(signal.SIGTERM, before)
    out, err = capsys.readouterr()
    assert "kalm_fast fwd B=1 float32: 1.5 ms" in out and "inf-cl fwd B=1 float32: ImportError: no" in out
    assert "infonce: interrupted after" in err and "2 rows kept" in err and "not run: soup" in err
    folder = common.results_dir("cpu")
    written = (folder / "infonce.csv").read_text()
    assert written.count("suite interrupted") == 2 and "ImportError: no; suite interrupted" in written
    assert "## infonce" in (folder / "summary.md").read_text()
    assert not (folder / "soup.csv").exists()
    assert not common.stop_journal()  # the journal is off after the run
