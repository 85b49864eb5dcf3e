"""Model-soup benchmarks (SPEC 7, issue 2), measured side by side in one run.

    python -m bench.bench_soup            # 3 generated Qwen2-0.5B-shaped bf16 checkpoints of 1.05 GB (then deleted)
    python -m bench.bench_soup --smoke    # tiny checkpoints, seconds
    python -m bench --suite soup          # with the other suites

files (any device): a uniform soup of K checkpoints, disk to disk. Each provider runs in a fresh subprocess; its
peak RSS is that child's own high-water mark, torch import and mapped file pages included: VmHWM of
/proc/self/status on Linux (its getrusage ru_maxrss would also count the parent's peak, which Linux carries across
exec), ru_maxrss elsewhere.
Time: until the output is on disk. kalm_fast fsyncs its files before it renames them into place, so for the others
the child fsyncs every output file right after the call, inside the timing (the same end state; on a 2-core VM
writing 1 GB back to disk costs ~1.7 s); the note gives the median time at which the call itself returned.
Every provider's first output is compared with the float64 mean: an element beyond 1/2 bf16 ulp + (K + 4) 2^-24
mean|x| (the bound of tests/test_soup.py), or fewer than 99.9% of the elements equal to RNE(mean): the row fails.
GB/s = (bytes read + bytes written) / seconds. The checkpoints are HF folders (model.safetensors + config.json).
  kalm_fast             `kalm-fast soup IN... -o OUT` (kalm_fast._C one-pass cpu_soup, C++ threads, pread streaming,
                        compensated sums)
  kalm_fast-plain       the same with --plain (plain fp32 sums)
  kalm_fast-torch-ops   the same streaming soup on its torch fallback (KALM_FAST_BACKEND=torch): the kernels' share
  torch-per-tensor      safetensors safe_open (mmap) per tensor, acc.add_(x.float(), alpha=w), output dict, save_file
  naive-load-all        safetensors.torch.load_file of every checkpoint, then average in fp32, save_file
  mergekit-linear       mergekit's linear merge, when mergekit is importable (else a row saying so)
  kalm_fast-cuda        soup(..., device="cuda") (GPU machines)
The kalm_fast output is then checked against a float64 reference (max error in bf16 ulps, share of elements equal
to the float64 mean rounded to bf16), and the peak RSS against SPEC 7's target: the largest tensor's fp32
accumulator (its elements x 4 bytes) + 512 MB.

gpu (CUDA only): one step acc += w * x over a Qwen2-0.5B-shaped bf16 state dict already on the GPU into fp32
accumulators (290+ tensors): the multi-tensor kernel vs torch per tensor (acc.add_(x.float(), alpha=w)) vs
torch._foreach_add_ with per-tensor casts, and the final cast; GB/s against the measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from kalm_fast.atomic import fsync_tree

SUITE = "soup"
ROOT = Path(__file__).resolve().parent.parent
FILE_PROVIDERS = ["kalm_fast", "kalm_fast-plain", "kalm_fast-torch-ops", "torch-per-tensor", "naive-load-all",
                  "mergekit-linear"]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def qwen2_config(smoke: bool) -> dict:
    """Qwen2-0.5B's shapes with 26 layers instead of 24 (1.05 GB in bf16: the issue asks for >= 1 GB each)."""
    if smoke:
        return dict(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    return dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=26,
                num_attention_heads=14, num_key_value_heads=2)


def qwen2_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]  # GQA: k/v projections are narrower
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    return shapes


def generate(folder: Path, k: int, smoke: bool) -> list[Path]:
    """k HF folders (Qwen2ForCausalLM config, tied embeddings, model.safetensors in bf16, values ~ N(0, 0.02))."""
    from safetensors.torch import save_file

    cfg = qwen2_config(smoke)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
              "dtype": "bfloat16", "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, **cfg}
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        state = {n: torch.randn(s, generator=g).mul_(0.02).to(torch.bfloat16) for n, s in qwen2_shapes(cfg).items()}
        path = folder / f"ckpt{i}"
        path.mkdir()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2))
        paths.append(path)
        del state
    return paths


# ----------------------------------------------------------------------------------------------------------------
# providers (run in a child process: python -m bench.bench_soup --child PROVIDER -o OUT IN...)
# ----------------------------------------------------------------------------------------------------------------


def _torch_per_tensor(inputs: list[Path], output: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = [safe_open(str(p / "model.safetensors"), framework="pt") for p in inputs]
    out = {}
    for name in files[0].keys():  # noqa: SIM118 (safe_open has no __iter__)
        acc = files[0].get_tensor(name).float()
        for f in files[1:]:
            acc.add_(f.get_tensor(name).float())
        out[name] = acc.div_(len(files)).to(torch.bfloat16)
    output.mkdir()
    save_file(out, str(output / "model.safetensors"), metadata={"format": "pt"})


def _naive_load_all(inputs: list[Path], output: Path) -> None:
    from safetensors.torch import load_file, save_file

    states = [load_file(str(p / "model.safetensors")) for p in inputs]
    out = {n: (sum(sd[n].float() for sd in states) / len(states)).to(torch.bfloat16) for n in states[0]}
    output.mkdir()
    save_file(out, str(output / "model.safetensors"), metadata={"format": "pt"})


def _mergekit_linear(inputs: list[Path], output: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate({
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs]})
    run_merge(config, str(output), options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True,
                                                        low_cpu_memory=True))


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (see the module docstring)."""
    try:
        return common.proc_status_mb("VmHWM")
    except (OSError, RuntimeError):
        scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is in bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _child(provider: str, inputs: list[Path], output: Path) -> None:
    if provider in ("kalm_fast", "kalm_fast-plain"):
        from kalm_fast import cli

        plain = ["--plain"] if provider.endswith("plain") else []
        run = functools.partial(cli.main, ["soup", *map(str, inputs), "-o", str(output), "-q", *plain])
    elif provider in ("kalm_fast-torch-ops", "kalm_fast-cuda"):
        from kalm_fast.soup import soup

        run = functools.partial(soup, inputs, output, device="cuda" if provider.endswith("cuda") else "cpu")
    else:
        run = functools.partial({"torch-per-tensor": _torch_per_tensor, "naive-load-all": _naive_load_all,
                                 "mergekit-linear": _mergekit_linear}[provider], inputs, output)
    base_mb = peak_rss_mb()
    t0 = time.perf_counter()
    status = run()
    returned = time.perf_counter() - t0
    if isinstance(status, int) and status:
        raise SystemExit(f"{provider} failed with exit status {status}")
    if not provider.startswith("kalm_fast"):  # kalm_fast fsyncs before it returns: the same work for everyone
        fsync_tree(output)
    print(json.dumps({"seconds": time.perf_counter() - t0, "returned_s": returned, "peak_rss_mb": peak_rss_mb(),
                      "import_rss_mb": base_mb}))


def _run_child(provider: str, inputs: list[Path], output: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if provider == "kalm_fast-torch-ops":
        env["KALM_FAST_BACKEND"] = "torch"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.bench_soup", "--child", provider,
                           "-o", str(output), *map(str, inputs)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{provider}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# files suite
# ----------------------------------------------------------------------------------------------------------------


def verify_against_float64(inputs: list[Path], output: Path) -> dict:
    """Max |soup - float64 mean| in bf16 ulps of the mean, and the share of elements equal to RNE_bf16(mean)."""
    from safetensors import safe_open

    files = [safe_open(str(p / "model.safetensors"), framework="pt") for p in inputs]
    shards = sorted(output.glob("*.safetensors"))  # mergekit names its one shard model-00001-of-00001
    if len(shards) != 1:
        raise AssertionError(f"expected one .safetensors file in the output, found {len(shards)}")
    out = safe_open(str(shards[0]), framework="pt")
    max_ulps, max_abs, equal, total, over = 0.0, 0.0, 0, 0, 0
    for name in files[0].keys():  # noqa: SIM118
        xs = [f.get_tensor(name).reshape(-1) for f in files]
        got = out.get_tensor(name).reshape(-1)
        for s in range(0, got.numel(), 1 << 23):  # float64 in 64 MB pieces
            mean = sum(x[s:s + (1 << 23)].double() for x in xs) / len(xs)
            scale = sum(x[s:s + (1 << 23)].double().abs() for x in xs) / len(xs)
            g = got[s:s + (1 << 23)]
            # tests/test_soup.py's bound: the final rounding (1/2 ulp of the output) + the fp32 sums' error
            gexp = (torch.frexp(g.double())[1] - 1).clamp(min=-126)
            tol = 0.5 * torch.ldexp(torch.ones_like(mean), gexp - 7) + (len(xs) + 4) * 2.0**-24 * scale
            over += int(((g.double() - mean).abs() > tol).sum())
            exp = (torch.frexp(mean)[1] - 1).clamp(min=-126)
            err = (g.double() - mean).abs()
            max_ulps = max(max_ulps, (err / torch.ldexp(torch.ones_like(mean), exp - 7)).max().item())
            max_abs = max(max_abs, err.max().item())
            equal += int((g == mean.float().to(torch.bfloat16)).sum())
            total += g.numel()
    return {"max_ulps": max_ulps, "max_abs": max_abs, "equal_share": equal / total, "over_bound": over}


def files_suite(smoke: bool, device: str) -> list[dict]:
    k, reps = 3, 1 if smoke else 3  # a provider whose first run takes over 30 s runs once
    cfg = qwen2_config(smoke)
    shapes = qwen2_shapes(cfg)
    largest = max(math.prod(s) for s in shapes.values())
    target_mb = largest * 4 / 2**20 + 512
    providers = FILE_PROVIDERS + (["kalm_fast-cuda"] if str(device).startswith("cuda") else [])
    if common.out_of_time():  # before writing the checkpoints (3 x 1 GB at full size)
        return [common.budget_row(SUITE, "soup_files", providers, torch.bfloat16, device)]
    workdir = Path(tempfile.mkdtemp(prefix="kalm-soup-bench-"))
    rows = []
    try:
        inputs = generate(workdir, k, smoke)
        in_bytes = sum((p / "model.safetensors").stat().st_size for p in inputs)
        size = in_bytes / k
        shape = f"{k}x{size / 1e9:.2f}GB" if size >= 1e8 else f"{k}x{size / 1e6:.1f}MB"
        shape += f" ({len(shapes)} tensors)"
        verified = {}
        for provider in common.within_budget(SUITE, "soup_files", providers, str, torch.bfloat16, device, rows):
            if provider == "mergekit-linear":
                try:
                    import mergekit  # noqa: F401
                except ImportError as e:
                    rows.append(common.failed_row(SUITE, "soup_files", provider, "cpu", shape, torch.bfloat16,
                                                  device, ImportError(f"skipped, mergekit is not installed ({e})")))
                    continue
            runs, mode = [], "cuda" if provider.endswith("cuda") else "cpu"
            try:
                for rep_i in range(reps):
                    out = workdir / f"out-{provider}"
                    runs.append(_run_child(provider, inputs, out))
                    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                    if rep_i == 0:  # every provider's output checked against the float64 mean before more runs
                        verified[provider] = v = verify_against_float64(inputs, out)
                        if v["over_bound"] or v["equal_share"] < 0.999:
                            raise AssertionError(f"{v['over_bound']} elements beyond 1/2 bf16 ulp + the fp32 sums' "
                                                 f"error bound of the float64 mean ({v['equal_share']:.4%} equal to "
                                                 "it): not timed further")
                    shutil.rmtree(out)
                    if runs[0]["seconds"] > 30:
                        break
            except Exception as e:  # one provider failing (OOM, missing package) must not hide the others
                rows.append(common.failed_row(SUITE, "soup_files", provider, mode, shape, torch.bfloat16, device, e))
                continue
            ms = sorted(r["seconds"] * 1e3 for r in runs)
            q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
            rss = max(r["peak_rss_mb"] for r in runs)
            met = "met" if rss <= target_mb else "MISSED"
            returned = statistics.median(r["returned_s"] for r in runs)
            note = (f"{len(runs)} run(s); time until the output is on disk (others' files fsynced in the timing: "
                    f"kalm_fast fsyncs before it returns); the call returned after {returned:.2f} s (median); "
                    f"load avg {os.getloadavg()[0]:.2f}; peak RSS {rss:.0f} MB (torch import alone "
                    f"{runs[0]['import_rss_mb']:.0f} MB); RSS target {target_mb:.0f} MB {met}")
            if provider in verified:
                v = verified[provider]
                note += (f"; vs float64 mean: max err {v['max_ulps']:.4f} bf16 ulp (max abs {v['max_abs']:.3g}), "
                         f"{v['equal_share']:.7%} of elements = RNE(mean)")
            times = (statistics.median(ms), q[1], q[7])
            rows.append(common.row(SUITE, "soup_files", provider, mode, shape, torch.bfloat16, device, times,
                                   nbytes=in_bytes + out_bytes, peak_mem_mb=rss, note=note))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GPU suite: the multi-tensor kernel on tensors already on the device
# ----------------------------------------------------------------------------------------------------------------


def gpu_suite(smoke: bool, device: str) -> list[dict]:
    from kalm_fast import _C
    from kalm_fast.soup import SoupAccumulator

    dev = torch.device(device)
    shapes = qwen2_shapes(qwen2_config(smoke))
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(s, generator=g, device=dev).mul_(0.02).to(torch.bfloat16).reshape(-1) for s in shapes.values()]
    accs = [torch.zeros(x.numel(), device=dev) for x in xs]
    numel = sum(x.numel() for x in xs)
    shape = f"{len(xs)} tensors, {numel / 1e6:.0f}M elements"
    stream = torch.cuda.current_stream(dev).cuda_stream
    w = 0.5
    rows = []

    big = torch.empty(max(numel, 1 << 26), device=dev)
    src = torch.empty_like(big)
    copy_t = common.bench_ms(lambda: big.copy_(src), device)
    copy_bytes = 2 * big.numel() * 4
    copy_gbps = copy_bytes / (copy_t[0] * 1e-3) / 1e9
    rows.append(common.row(SUITE, "device_copy", "torch", "copy", f"{big.numel() / 1e6:.0f}M fp32", torch.float32,
                           device, copy_t, nbytes=copy_bytes, note="reference bandwidth (read + write)"))

    step_bytes = numel * (2 + 4 + 4)  # read x (bf16), read and write acc (fp32)
    entries = [(a.data_ptr(), 0, x.data_ptr(), x.numel(), _C.DTYPE_BF16) for a, x in zip(accs, xs)]
    comps = [torch.zeros_like(a) for a in accs]
    entries_comp = [(a.data_ptr(), c.data_ptr(), x.data_ptr(), x.numel(), _C.DTYPE_BF16)
                    for a, c, x in zip(accs, comps, xs)]
    acc_api = SoupAccumulator(dev)
    acc_api.add({str(i): x for i, x in enumerate(xs)})
    state = {str(i): x for i, x in enumerate(xs)}
    providers = {
        "kalm_fast": (lambda: _C.cuda_accumulate(entries, w, False, stream), step_bytes),
        "kalm_fast-compensated": (lambda: _C.cuda_accumulate(entries_comp, w, False, stream), numel * (2 + 16)),
        "kalm_fast-SoupAccumulator.add": (lambda: acc_api.add(state, weight=w), step_bytes),
        "torch-per-tensor": (lambda: [a.add_(x.float(), alpha=w) for a, x in zip(accs, xs)], step_bytes),
        "torch-foreach": (lambda: torch._foreach_add_(accs, [x.float() for x in xs], alpha=w), step_bytes),
    }
    for name, (fn, nbytes) in providers.items():
        t = common.bench_ms(fn, device, warmup=3, rep=20)
        gbps = nbytes / (t[0] * 1e-3) / 1e9
        rows.append(common.row(SUITE, "accumulate", name, "acc += w*x", shape, torch.bfloat16, device, t,
                               nbytes=nbytes, peak_mem_mb=common.peak_memory_mb(fn, device),
                               note=f"{gbps / copy_gbps:.0%} of the measured copy bandwidth"))

    outs = [torch.empty(x.numel(), dtype=torch.bfloat16, device=dev) for x in xs]
    cast_entries = [(a.data_ptr(), 0, o.data_ptr(), o.numel(), _C.DTYPE_BF16) for a, o in zip(accs, outs)]
    div = torch.tensor(3.0, device=dev)
    cast_bytes = numel * (4 + 2)
    for name, fn in {"kalm_fast": lambda: _C.cuda_cast(cast_entries, 3.0, stream),
                     "torch-per-tensor": lambda: [o.copy_(a / div) for a, o in zip(accs, outs)]}.items():
        t = common.bench_ms(fn, device, warmup=3, rep=20)
        gbps = cast_bytes / (t[0] * 1e-3) / 1e9
        rows.append(common.row(SUITE, "cast", name, "bf16 = RNE(acc / W)", shape, torch.bfloat16, device, t,
                               nbytes=cast_bytes, note=f"{gbps / copy_gbps:.0%} of the measured copy bandwidth"))
    return rows


def run(*, smoke: bool, device: str) -> list[dict]:
    rows = files_suite(smoke, device)
    if str(device).startswith("cuda") and torch.cuda.is_available():
        if common.out_of_time():  # --budget-s spent
            rows.append(common.budget_row(SUITE, "soup_gpu", ["the GPU suite"], torch.bfloat16, device))
        else:
            try:  # the extension may be missing or built without CUDA (a failed build): say so, keep the file rows
                from kalm_fast import _C

                if not getattr(_C, "compiled_with_cuda", False):
                    raise RuntimeError("kalm_fast._C was built without CUDA (KALM_FAST_CUDA=1 pip install -e .)")
                rows += gpu_suite(smoke, device)
            except Exception as error:
                rows.append(common.failed_row(SUITE, "accumulate", "kalm_fast", "acc += w*x", "qwen2 state",
                                              torch.bfloat16, device, error))
    return rows


def main(argv=None) -> int:
    p = common.standard_args(__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one provider, print its JSON result
    p.add_argument("-o", dest="output", help=argparse.SUPPRESS)
    p.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, [Path(x) for x in args.inputs], Path(args.output))
        return 0
    rows = run(smoke=args.smoke, device=args.device)
    common.report(rows, args.device, stem=SUITE, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
