"""Streaming model soup: kalm_fast.soup (soup, SoupAccumulator, greedy_soup), kalm_fast._C, `kalm-fast soup`.

How correctness is judged. The soup is ``RNE_dtype(fp32(sum_i w_i x_i) / fp32(sum_i w_i))``. Against the float64
mean an output element may be off by half a unit in the last place of the output dtype (the final rounding, measured
at the output value: |RNE(a) - a| <= ulp(RNE(a)) / 2) plus the fp32 error before it, which is at most
(n + 4) * 2^-24 * sum_i w_i |x_i| / sum_i w_i to first order: n - 1 rounded sums, n rounded products, the rounding of
the weights and of their sum, and the division, each within 2^-24 relative of at most that magnitude. That is the
whole tolerance (``soup_tolerance``); it is not widened. The extension, its torch fallback and the CUDA kernels
perform the same IEEE fp32 operations in the same order, so they are compared bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA
from safetensors.torch import load_file, save_file

import kalm_fast
from kalm_fast import cli

S = importlib.import_module("kalm_fast.soup")  # the package (kalm_fast.soup is also callable as the function)
PARTS = [importlib.import_module(f"kalm_fast.soup.{m}") for m in ("_format", "_checks", "_kernels", "_stream",
                                                                  "_files", "_accumulate")]
K, FILES = importlib.import_module("kalm_fast.soup._kernels"), importlib.import_module("kalm_fast.soup._files")
soup, SoupAccumulator, SoupError, greedy_soup = S.soup, S.SoupAccumulator, S.SoupError, S.greedy_soup

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
CANONICAL_NAN = {BF16: 0x7FC0, F16: 0x7E00, F32: 0x7FC00000}  # every soup output's NaN (csrc/soup_math.h)
PRECISION = {BF16: (8, -126), F16: (11, -14), F32: (24, -126)}  # significant bits, smallest normal exponent
SHAPES = {"embed": (301, 37), "norm": (1025,), "scale": (), "empty": (0, 3), "big": (203, 197)}
WEIGHTS = [3.0, 0.5, 1.25]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def save(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def make_folder(folder: Path, tensors: dict, shards: int = 1) -> Path:
    """A Hugging Face-style model folder: model.safetensors, or shards + model.safetensors.index.json; a config."""
    folder.mkdir(parents=True)
    if shards == 1:
        save(folder / "model.safetensors", tensors)
    else:
        names, weight_map = list(tensors), {}
        for k in range(shards):
            shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save(folder / shard, {n: tensors[n] for n in names[k::shards]})
            weight_map.update({n: shard for n in names[k::shards]})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "bfloat16"}))
    return folder


def snapshot(*paths: Path) -> dict:
    """sha256 and mtime of every file under paths: inputs must come out of a soup byte-identical and untouched."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files}


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at v (float64), subnormals included."""
    bits, emin = PRECISION[dtype]
    exp = (torch.frexp(v.double())[1] - 1).clamp(min=emin)  # floor(log2 |v|); frexp gives 0 for v = 0
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), exp - (bits - 1))


def float64_soup(tensors: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i x_i / sum_i w_i, sum_i w_i |x_i| / sum_i w_i) in float64."""
    w = torch.tensor(weights, dtype=torch.float64)
    mean = sum(wi * t.double() for wi, t in zip(w, tensors)) / w.sum()
    scale = sum(wi * t.double().abs() for wi, t in zip(w, tensors)) / w.sum()
    return mean, scale


def soup_tolerance(out: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    return 0.5 * ulp(out.double(), out.dtype) + (n + 4) * 2.0**-24 * scale


def assert_soup_close(out: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], name: str) -> None:
    mean, scale = float64_soup(tensors, weights)
    assert out.shape == mean.shape, f"{name}: shape {tuple(out.shape)} != {tuple(mean.shape)}"
    err = (out.double() - mean).abs()
    tol = soup_tolerance(out, scale, len(tensors))
    bad = err > tol
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.numel()} elements off by more than the output rounding "
                           f"+ fp32 accumulation bound; worst err {err.max().item():.3g} (tol there "
                           f"{tol.flatten()[err.flatten().argmax()].item():.3g})")
    if out.dtype != F32 and out.numel() > 100:
        # fp32 errors ~2^-24 relative cannot move a 16-bit rounding except within 2^-24 of a midpoint
        same = (out == mean.to(out.dtype)).double().mean().item()
        assert same >= 0.999, f"{name}: only {same:.4f} of the elements equal RNE(float64 mean)"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".kalm-soup-" in p.name)


def read_st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


@pytest.fixture
def mixed(tmp_path) -> tuple[list[Path], list[dict]]:
    """Three .safetensors files; every tensor has a different dtype in each file and the dtypes vary within a file,
    magnitudes from 0.01 to 100 with per-file offsets; odd shapes, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(1)
    paths, states = [], []
    for i in range(3):
        sd = {name: (torch.randn(shape, generator=g) * 10.0 ** (j - 2) + i).to([BF16, F16, F32][(i + j) % 3])
              for j, (name, shape) in enumerate(SHAPES.items())}
        paths.append(save(tmp_path / f"in{i}.safetensors", sd))
        states.append(sd)
    return paths, states


@pytest.fixture
def disable_ext(monkeypatch):
    """Call it to make kalm_fast._C unimportable: the soup then falls back to torch, with its warning."""

    def disable():
        monkeypatch.setitem(sys.modules, "kalm_fast._C", None)
        monkeypatch.delattr(kalm_fast, "_C", raising=False)
        K._load_ext.cache_clear()

    yield disable
    K._load_ext.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,dtype,compensated", [(None, None, True), (4096, None, True), (None, "fp32", True),
                                                     (None, "bf16", True), (None, None, False), (4096, "fp16", False)])
def test_soup_matches_float64_reference(mixed, tmp_path, monkeypatch, chunk, dtype, compensated):
    paths, states = mixed
    if chunk:  # groups of several tensors, and "big" / "embed" split across groups
        patch_soup(monkeypatch, "_CHUNK_CPU", chunk)
    before = snapshot(*paths)
    out = soup(paths, tmp_path / "out.safetensors", weights=WEIGHTS, dtype=dtype, compensated=compensated)
    assert snapshot(*paths) == before
    assert leftovers(tmp_path) == []
    result = load_file(out)
    assert set(result) == set(SHAPES)
    assert read_st_header(out)["__metadata__"] == {"format": "pt"}
    for name in SHAPES:
        expected_dtype = {None: states[0][name].dtype, "fp32": F32, "bf16": BF16, "fp16": F16}[dtype]
        assert result[name].dtype == expected_dtype, name
        assert_soup_close(result[name], [sd[name] for sd in states], WEIGHTS, name)


def test_compensated_soup_survives_cancellation(tmp_path):
    """Checkpoints [a, b, -b] with |a| ~ 1e-7 << |b| ~ 0.02 (what the 1 GB benchmark found in ~10 of 524M elements):
    plain fp32 loses a in a + b and the mean a / 3 comes out several bf16 ulps off; the compensated soup (the default)
    is within half a bf16 ulp plus 2^-23 relative (its s + c and division roundings) of the exact mean."""
    g = torch.Generator().manual_seed(7)
    b = (0.02 * torch.randn(4096, generator=g)).to(BF16)
    a = (1e-7 * torch.randn(4096, generator=g)).to(BF16)
    paths = [save(tmp_path / f"m{i}.safetensors", {"w": x}) for i, x in enumerate([a, b, -b])]
    mean = a.double() / 3
    err = {}
    for compensated in (True, False):
        out = soup(paths, tmp_path / f"out{compensated}.safetensors", compensated=compensated)
        err[compensated] = (load_file(out)["w"].double() - mean).abs() / ulp(mean, BF16)
    assert err[True].max() <= 0.5 + 2.0**-15, err[True].max()
    assert err[False].max() > 2, "the case no longer shows the plain sum's cancellation error"


def test_compensated_beats_plain_over_64_bf16_checkpoints():
    """64 bf16 checkpoints of a zero-mean weight (std 0.02) with uneven weights: the soup (~0.003) is far smaller
    than the terms (sum w|x| / sum w ~ 0.016), so the plain fp32 sum's rounding errors (~2^-24 of the running sum,
    growing like sqrt(n)) are hundreds of ulps of the result. The compensated sum sees exact products (bf16 x times
    the 13 + 11-bit weight split) and recovers every addition's error, so only three roundings remain: s + c, the sum
    of the weights and the division, each within 2^-24 relative, plus Neumaier's second-order term 2n(2^-24)^2 of
    sum w|x|. The improvement factor measured here is ~440x; 50x leaves room for other seeds."""
    g = torch.Generator().manual_seed(0)
    xs = [(0.02 * torch.randn(8192, generator=g)).to(BF16) for _ in range(64)]
    ws = torch.empty(64).uniform_(0.1, 1.0, generator=g).tolist()  # fp32 values: rounding them is exact
    mean, scale = float64_soup(xs, ws)
    results = {}
    for compensated in (False, True):
        acc = SoupAccumulator(compensated=compensated)
        for w, x in zip(ws, xs):
            acc.add({"w": x}, weight=w)
        results[compensated] = acc.result(F32)["w"].double()
    err_plain, err_comp = ((results[c] - mean).abs() for c in (False, True))
    bound = 3 * 2.0**-24 * mean.abs() + 2 * 64 * 2.0**-48 * scale
    assert (err_comp <= bound).all(), f"compensated error {err_comp.max():.3g} above its bound"
    rms = {k: (e / ulp(mean, F32)).pow(2).mean().sqrt().item() for k, e in (("plain", err_plain), ("comp", err_comp))}
    assert rms["comp"] * 50 <= rms["plain"], f"RMS error in fp32 ulps: {rms}"


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("divisor", [1.0, 3.0])
def test_cast_rounds_to_nearest_even_like_torch(divisor, backend):
    """fp32 -> bf16/fp16/fp32 against torch's .to() bit for bit: ties with even and odd kept bits, values just
    beside ties, overflow to Inf, subnormals, signed zeros, Inf; every NaN (either sign, any payload) becomes its
    dtype's canonical NaN. Plus 2^20 random bit patterns (8 million of the 2^32 are NaN: ~2,000 here). Both the
    extension and the torch fallback."""
    ties = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x3F801000, 0x3F803000]  # bf16 ties / fp16 ties
    edges = [0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x477FF000, 0x477FEFFF, 0x477FE000,  # bf16 / fp16 overflow
             0x00000001, 0x00400000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,  # subnormals (fp32, fp16)
             0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**32, (1 << 20,), generator=g, dtype=torch.int64)
    bits = torch.cat([torch.tensor(ties + edges, dtype=torch.int64), rand])
    x = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(F32)
    kernels = K._Kernels(torch.device("cpu"))
    assert kernels.ext is not None
    if backend == "torch":
        kernels.ext = None
    for dtype in (BF16, F16, F32):
        out = torch.empty(x.numel(), dtype=dtype)
        kernels.cast([(x, None, out)], divisor)
        expected = (x / divisor).to(dtype)
        nan = expected.isnan()
        ints = torch.int16 if dtype != F32 else torch.int32
        assert torch.equal(out[~nan].view(ints), expected[~nan].view(ints)), dtype
        assert nan.sum() > 1000 and (out[nan].view(ints) == CANONICAL_NAN[dtype]).all(), dtype


def test_nan_and_inf_leave_every_backend_alike():
    """Accumulate then cast, extension and torch fallback, plain and compensated, with weights that are not fp32
    (0.3, 0.7: the fallback's weight split once kept their bits below fp32): NaN inputs of either sign and any
    payload, Inf - Inf (x86 makes the negative default NaN there), Inf, and finite values give the same bits in
    every output dtype -- NaN as the canonical one."""
    bits = [0x7FC1, 0xFFC0, 0x7F81, 0xFF81, 0x7F80, 0xFF80, 0x3F80, 0xC040, 0x0001]
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(BF16),
                   torch.randn(4096, generator=g).to(BF16)])
    y = torch.cat([torch.tensor([0x3F80, 0x3F80, 0x3F80, 0xBF80, 0xFF80, 0x7F80, 0x7F80, 0x3F80, 0x8001],
                                dtype=torch.int32).to(torch.int16).view(BF16), torch.randn(4096, generator=g).to(BF16)])
    for compensated in (False, True):
        for dtype in (BF16, F16, F32):
            ints = torch.int16 if dtype != F32 else torch.int32
            got = {}
            for backend in ("ext", "torch"):
                kernels = K._Kernels(torch.device("cpu"))
                if backend == "torch":
                    kernels.ext = None
                acc, comp = torch.empty(x.numel()), torch.empty(x.numel()) if compensated else None
                kernels.accumulate([(acc, comp, x)], 0.3, first=True)
                kernels.accumulate([(acc, comp, y)], 0.7, first=False)
                out = torch.empty(x.numel(), dtype=dtype)
                kernels.cast([(acc, comp, out)], 1.0)
                got[backend] = out.view(ints)
            assert torch.equal(got["ext"], got["torch"]), (compensated, dtype, got)
            nan = got["ext"].view(dtype).isnan()
            assert nan[:6].all() and not nan[6:].any() and (got["ext"][nan] == CANONICAL_NAN[dtype]).all()


def test_upcast_is_exact_for_every_16_bit_pattern():
    """All 65536 bf16 and fp16 bit patterns (subnormals, Inf, NaN) through acc = 1 * x equal torch's .float()."""
    kernels = K._Kernels(torch.device("cpu"))
    for dtype in (BF16, F16):
        x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        acc = torch.empty(x.numel(), dtype=F32)
        kernels.accumulate([(acc, None, x)], 1.0, first=True)
        expected = x.float()
        nan = expected.isnan()
        assert torch.equal(acc[~nan].view(torch.int32), expected[~nan].view(torch.int32)), dtype
        assert acc[nan].isnan().all(), dtype


@pytest.mark.parametrize("compensated", [False, True])
def test_one_pass_cpu_soup_equals_accumulate_then_cast(compensated):
    """kalm_fast._C.cpu_soup (every input of a chunk summed and cast on L1 tiles) gives the bits of accumulate over
    the inputs, then cast: random bit patterns of every dtype (NaN, Inf, subnormals included), entries whose sizes
    are not multiples of the tile, weights with and without a low part; and soup() on CPU takes that path."""
    kernels = K._Kernels(torch.device("cpu"))
    assert kernels.fused, "kalm_fast._C lacks cpu_soup: rebuild it"
    g = torch.Generator().manual_seed(3)

    def pattern(n, dtype):
        if dtype == F32:
            return torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(F32)
        return torch.randint(-2**15, 2**15, (n,), generator=g, dtype=torch.int32).to(torch.int16).view(dtype)

    sizes, dtypes = [5000, 1, 2048, 70001], [BF16, F16, F32, BF16]
    weights = [1.0, 0.3, 0.7, 1 / 3]
    inputs = [[pattern(n, dtypes[(j + k) % 4]) for k in range(4)] for j, n in enumerate(sizes)]
    for out_dtype in (BF16, F16, F32):
        got = [torch.empty(n, dtype=out_dtype) for n in sizes]
        kernels.soup(list(zip(got, inputs)), weights, 2.75, compensated)
        for j, n in enumerate(sizes):
            acc, comp = torch.empty(n), torch.empty(n) if compensated else None
            for k, w in enumerate(weights):
                kernels.accumulate([(acc, comp, inputs[j][k])], w, first=k == 0)
            want = torch.empty(n, dtype=out_dtype)
            kernels.cast([(acc, comp, want)], 2.75)
            ints = torch.int32 if out_dtype == F32 else torch.int16
            assert torch.equal(got[j].view(ints), want.view(ints)), (out_dtype, n)
    streamer = importlib.import_module("kalm_fast.soup._stream")._Streamer([], {}, 1.0, torch.device("cpu"), 1 << 20,
                                                                           compensated)
    assert streamer.fused


def test_torch_fallback_equals_extension(mixed, tmp_path, disable_ext):
    paths, states = mixed
    ext_out = soup(paths, tmp_path / "ext.safetensors", weights=WEIGHTS)
    ext_acc = {c: SoupAccumulator(compensated=c) for c in (False, True)}
    for acc in ext_acc.values():
        for sd, w in zip(states, WEIGHTS):
            acc.add(sd, weight=w)
    disable_ext()
    with pytest.warns(RuntimeWarning, match=r"torch fallback: rebuild it with `python setup.py build_ext --inplace`"):
        torch_out = soup(paths, tmp_path / "torch.safetensors", weights=WEIGHTS)
    assert K._Kernels(torch.device("cpu")).ext is None
    assert torch_out.read_bytes() == ext_out.read_bytes()
    for c in (False, True):
        acc = SoupAccumulator(compensated=c)
        for sd, w in zip(states, WEIGHTS):
            acc.add(sd, weight=w)
        for dtype in (F32, BF16):
            got, want = acc.result(dtype), ext_acc[c].result(dtype)
            assert all(torch.equal(got[n], want[n]) for n in SHAPES), (c, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face folders
# ----------------------------------------------------------------------------------------------------------------


def test_sharded_hf_folder_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folders, states = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = transformers.AutoModel.from_config(config).to(BF16)
        model.save_pretrained(tmp_path / f"run{seed}", max_shard_size="100KB")
        folders.append(tmp_path / f"run{seed}")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    (folders[0] / "tokenizer.json").write_text('{"toy": true}')
    (folders[0] / "1_Pooling").mkdir()
    (folders[0] / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    index0 = json.loads((folders[0] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index0["weight_map"].values()))
    assert len(shards) > 1, "max_shard_size did not shard the model"
    before = snapshot(*folders)

    weights = [1.0, 2.0, 1.0]
    out = soup(folders, tmp_path / "souped", weights=weights)
    assert snapshot(*folders) == before
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == index0["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in states[0].values())
    for side in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        assert (out / side).read_bytes() == (folders[0] / side).read_bytes(), side
    loaded = transformers.AutoModel.from_pretrained(out).state_dict()
    assert loaded.keys() == states[0].keys()
    for name, t in loaded.items():
        assert t.dtype == BF16, name
        assert_soup_close(t, [sd[name] for sd in states], weights, name)

    out32 = soup(folders, tmp_path / "souped32", weights=weights, dtype=F32)
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    loaded32 = transformers.AutoModel.from_pretrained(out32, dtype=F32).state_dict()
    for name, t in loaded32.items():
        assert t.dtype == F32, name
        assert_soup_close(t, [sd[name] for sd in states], weights, name)


def test_inputs_with_different_layouts(tmp_path):
    """inputs[0] sharded, the others a single-file folder and a bare file: the output mirrors inputs[0], except its
    weights in another format, which are not averaged and so not copied (with a warning)."""
    g = torch.Generator().manual_seed(3)
    states = [{f"layer{k}.w": torch.randn(50 + k, 7, generator=g).to(BF16) for k in range(5)} for _ in range(3)]
    a = make_folder(tmp_path / "a", states[0], shards=3)
    (a / "pytorch_model.bin").write_bytes(b"inputs[0]'s weights in another format")
    b = make_folder(tmp_path / "b", states[1])
    c = save(tmp_path / "c.safetensors", states[2])
    with pytest.warns(RuntimeWarning, match=r"not averaged and not copied .*: pytorch_model\.bin"):
        out = soup([a, b, c], tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in a.iterdir() if p.suffix != ".bin")
    merged = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    for name in states[0]:
        assert_soup_close(merged[name], [sd[name] for sd in states], [1.0, 1.0, 1.0], name)


# ----------------------------------------------------------------------------------------------------------------
# reliability: bad inputs, crashes
# ----------------------------------------------------------------------------------------------------------------


def _case_inputs(tmp_path: Path, case: str):
    """(inputs, output, kwargs, exception type, substrings the message must contain) for one bad-input case."""
    g = torch.Generator().manual_seed(2)
    good = {"embed": torch.randn(40, 8, generator=g).to(BF16), "norm": torch.randn(8, generator=g),
            "big": torch.randn(30, 3, generator=g).to(F16)}
    a = save(tmp_path / "a.safetensors", good)
    b = save(tmp_path / "b.safetensors", good)
    out = tmp_path / "out.safetensors"
    if case == "missing file":
        return [a, tmp_path / "nope.safetensors"], out, {}, SoupError, ["nope.safetensors", "no such file"]
    if case == "truncated file":
        data = b.read_bytes()
        b.write_bytes(data[: len(data) - 100])
        return [a, b], out, {}, SoupError, [str(b), "truncated"]
    if case == "garbage file":
        b.write_bytes(os.urandom(4096))
        return [a, b], out, {}, SoupError, [str(b), "not a valid safetensors file"]
    if case == "header not json":
        b.write_bytes((9).to_bytes(8, "little") + b"{not json")
        return [a, b], out, {}, SoupError, [str(b), "not valid JSON"]
    if case == "every mismatch listed":
        bad = dict(good, extra=torch.zeros(2), embed=torch.zeros(8, 40, dtype=BF16), big=torch.zeros(90, dtype=F16))
        del bad["norm"]
        save(b, bad)
        c = save(tmp_path / "c.safetensors", dict(good, position_ids=torch.arange(4)))
        return [a, b, c], out, {}, SoupError, [
            "inputs[1]", "lacks 1 tensor(s) of inputs[0]: norm", "not in inputs[0]: extra", "'embed' has shape [8, 40]",
            "'big' has shape [90]", "inputs[2]", "position_ids", "'position_ids' is I64"]
    if case == "non-float in every input":
        for p in (a, b):
            save(p, dict(good, ids=torch.arange(3, dtype=torch.int32)))
        return [a, b], out, {}, SoupError, ["'ids' is I32 in inputs[0]", "'ids' is I32 in inputs[1]", "F32, F16"]
    if case == "folder without weights":
        (tmp_path / "empty").mkdir()
        return [a, tmp_path / "empty"], out, {}, SoupError, [str(tmp_path / "empty"), "model.safetensors"]
    if case == "index names a missing shard":
        folder = make_folder(tmp_path / "sharded", good, shards=2)
        (folder / "model-00002-of-00002.safetensors").unlink()
        return [folder, a], tmp_path / "out", {}, SoupError, ["model-00002-of-00002.safetensors", "not found"]
    if case == "weights length":
        return [a, b], out, {"weights": [1.0]}, ValueError, ["weights has 1 values for 2 inputs"]
    if case == "negative weight":
        return [a, b], out, {"weights": [1.0, -0.5]}, ValueError, ["weights[1]", ">= 0"]
    if case == "nan weight":
        return [a, b], out, {"weights": [math.nan, 1.0]}, ValueError, ["weights[0]", "finite"]
    if case == "inf weight":
        return [a, b], out, {"weights": [1.0, math.inf]}, ValueError, ["weights[1]", "finite"]
    if case == "zero weights":
        return [a, b], out, {"weights": [0.0, 0.0]}, ValueError, ["positive sum"]
    if case == "output exists":
        out.write_bytes(b"precious")
        return [a, b], out, {}, FileExistsError, [str(out), "overwrite=True"]
    if case == "output is an input":
        return [a, b], a, {"overwrite": True}, ValueError, [str(a), "inputs are never modified"]
    if case == "output inside an input folder":
        folder = make_folder(tmp_path / "model", good)
        return [folder, a], folder / "soup", {}, ValueError, [str(folder), "inside"]
    if case == "input inside the output":
        folder = make_folder(tmp_path / "outer" / "model", good)
        return [folder, a], tmp_path / "outer", {"overwrite": True}, ValueError, [str(folder), "inside the output"]
    if case == "output not .safetensors":
        return [a, b], tmp_path / "out.bin", {}, ValueError, ["must be a .safetensors path"]
    if case == "bad dtype":
        return [a, b], out, {"dtype": "int8"}, ValueError, ["dtype must be one of"]
    if case == "bad device":
        return [a, b], out, {"device": "tpu"}, ValueError, ["device must be 'cpu' or 'cuda'"]
    raise AssertionError(case)


BAD_CASES = ["missing file", "truncated file", "garbage file", "header not json", "every mismatch listed",
             "non-float in every input", "folder without weights", "index names a missing shard", "weights length",
             "negative weight", "nan weight", "inf weight", "zero weights", "output exists", "output is an input",
             "output inside an input folder", "input inside the output", "output not .safetensors", "bad dtype",
             "bad device"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_are_refused_and_leave_nothing(tmp_path, case):
    inputs, output, kwargs, exc, needles = _case_inputs(tmp_path, case)
    before = snapshot(tmp_path)
    with pytest.raises(exc) as info:
        soup(inputs, output, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error:\n{message}"
    assert snapshot(tmp_path) == before  # no output, no temporary, inputs untouched


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_refused(mixed, tmp_path):
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        soup(mixed[0], tmp_path / "out.safetensors", device="cuda")


def patch_soup(monkeypatch, name: str, value) -> None:
    """Sets ``name`` in every module of kalm_fast.soup that binds it (a helper imported by several modules)."""
    bound = [m for m in PARTS if hasattr(m, name)]
    assert bound, name
    for m in bound:
        monkeypatch.setattr(m, name, value)


def _fail_on_call(monkeypatch, name: str, k: int):
    """Makes kalm_fast.soup's <name> raise OSError on its k-th call (counting from 1), wherever it is called from."""
    real, calls = next(getattr(m, name) for m in PARTS if hasattr(m, name)), [0]

    @functools.wraps(real)
    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    patch_soup(monkeypatch, name, flaky)
    return calls


@pytest.mark.parametrize("folder", [False, True])
def test_crash_mid_write_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch, folder):
    g = torch.Generator().manual_seed(4)
    states = [{f"t{k}": torch.randn(3000, generator=g).to(BF16) for k in range(6)} for _ in range(2)]
    if folder:
        inputs = [make_folder(tmp_path / f"m{i}", sd, shards=2) for i, sd in enumerate(states)]
        out = tmp_path / "out"
    else:
        inputs = [save(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(states)]
        out = tmp_path / "out.safetensors"
    patch_soup(monkeypatch, "_CHUNK_CPU", 4096)  # several groups per file: the failure lands mid-file
    before = snapshot(*inputs)
    calls = _fail_on_call(monkeypatch, "_write_all", 4)
    with pytest.raises(OSError, match="simulated"):
        soup(inputs, out)
    assert calls[0] >= 4 and not out.exists() and leftovers(tmp_path) == []

    if folder:  # a previous output, to be replaced only by a complete new one
        out.mkdir()
        (out / "old.txt").write_text("previous soup")
    else:
        out.write_bytes(b"previous soup")
    old = snapshot(out)
    calls[0] = 0
    with pytest.raises(OSError, match="simulated"):
        soup(inputs, out, overwrite=True)
    assert snapshot(out) == old and leftovers(tmp_path) == []
    assert snapshot(*inputs) == before

    soup(inputs, out, overwrite=True)  # and a run that succeeds replaces it
    assert not (out / "old.txt").exists() if folder else out.read_bytes() != b"previous soup"
    assert leftovers(tmp_path) == []


def test_failed_final_rename_restores_the_old_output(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    inputs = [make_folder(tmp_path / f"m{i}", {"w": torch.randn(64, generator=g)}) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous soup")
    old = snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        if ".kalm-soup-" in str(src) and "-old-" not in str(src):  # the new soup moving into place
            raise OSError(5, "I/O error (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        soup(inputs, out, overwrite=True)
    assert snapshot(out) == old and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_streaming_peak_rss_stays_below_one_input(tmp_path):
    """Three 32 MB checkpoints (one 16M-element bf16 tensor each) souped with 256Ki-element chunks in a fresh
    process: the peak RSS during the soup (VmHWM after resetting it, mapped file pages included) may grow by the
    staging, accumulator and output buffers (~4 MB here), never by a whole tensor or file (32 MB)."""
    for i in range(3):
        save(tmp_path / f"m{i}.safetensors", {"w": torch.full((1 << 24,), float(i), dtype=BF16)})
    script = textwrap.dedent(f"""
        import importlib
        S = importlib.import_module("kalm_fast.soup")
        importlib.import_module("kalm_fast.soup._files")._CHUNK_CPU = 1 << 18
        importlib.import_module("kalm_fast.soup._kernels")._load_ext()  # before the baseline

        def status_kb(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        base = status_kb("VmRSS:")
        S.soup([{str(tmp_path)!r} + f"/m{{i}}.safetensors" for i in range(3)], {str(tmp_path / 'out.safetensors')!r})
        print((status_kb("VmHWM:") - base) / 1024)
    """)
    growth_mb = float(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                     text=True).stdout.split()[-1])
    assert growth_mb < 16, f"peak RSS grew by {growth_mb:.1f} MB while souping 3 x 32 MB"
    assert torch.equal(load_file(tmp_path / "out.safetensors")["w"][:5], torch.ones(5, dtype=BF16))


# ----------------------------------------------------------------------------------------------------------------
# SoupAccumulator, greedy_soup
# ----------------------------------------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    def __init__(self, seed: int, dtype=F32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(33, 5, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))


def test_accumulator_sources_result_and_load_into(tmp_path):
    models = [Toy(k, BF16) for k in range(3)]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    path = save(tmp_path / "m1.safetensors", states[1])
    folder = make_folder(tmp_path / "m2", states[2], shards=2)
    acc = SoupAccumulator(compensated=True).add(models[0], weight=2.0).add(path).add(folder, weight=0.5)
    assert acc.count == 3 and acc.total_weight == 3.5
    result = acc.result()
    assert {k: v.dtype for k, v in result.items()} == {"w": BF16, "b": BF16}
    for name, t in result.items():
        assert_soup_close(t, [sd[name] for sd in states], [2.0, 1.0, 0.5], name)
    assert all(t.dtype == F16 for t in acc.result("fp16").values())

    target = Toy(9, F32)
    assert acc.load_into(target) is target
    exact = acc.result(F32)
    assert target.w.dtype == F32 and torch.equal(target.w.detach(), exact["w"])

    trial = acc.copy().add(states[0])
    assert trial.count == 4 and acc.count == 3 and torch.equal(acc.result(F32)["w"], exact["w"])


def test_accumulator_refuses_mismatches_and_stays_unchanged():
    acc = SoupAccumulator().add({"w": torch.ones(4, 2), "b": torch.ones(2)})
    before = acc.result(F32)
    bad = {"w": torch.ones(2, 4), "extra": torch.ones(1), "ids": torch.arange(3)}
    with pytest.raises(SoupError) as info:
        acc.add(bad)
    message = str(info.value)
    for needle in ["lacks 1 tensor(s) of the soup: b", "not in the soup: extra, ids", "'w' has shape [2, 4]",
                   "'ids' is int64"]:
        assert needle in message, message
    assert acc.count == 1 and all(torch.equal(acc.result(F32)[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        acc.add({"w": torch.ones(4, 2), "b": torch.ones(2)}, weight=-1)
    with pytest.raises(ValueError, match="the soup is empty"):
        SoupAccumulator().add({"w": torch.ones(2)}, weight=0.0).result()
    with pytest.raises(TypeError, match="state dict values must be tensors"):
        SoupAccumulator().add({"w": [1.0, 2.0]})


def test_accumulator_add_is_all_or_nothing_when_a_read_fails(tmp_path, monkeypatch):
    """A checkpoint whose read fails midway (an I/O error on its second tensor, or a file truncated after its
    header) leaves the soup exactly as it was; the first checkpoint too leaves an empty soup behind."""
    states = [{"a": torch.full((64,), float(k)), "b": torch.full((32,), 10.0 * k), "c": torch.ones(8) * k}
              for k in range(1, 4)]
    paths = [save(tmp_path / f"m{k}.safetensors", sd) for k, sd in enumerate(states)]
    acc = SoupAccumulator(compensated=True).add(paths[0])
    before = acc.result(F32)
    real = S._stream._pread_into
    calls = []

    def failing(fd, view, offset, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "I/O error (simulated)")
        real(fd, view, offset, path)

    patch_soup(monkeypatch, "_pread_into", failing)
    with pytest.raises(OSError, match="simulated"):
        acc.add(paths[1])
    patch_soup(monkeypatch, "_pread_into", real)
    assert acc.count == 1 and all(torch.equal(acc.result(F32)[k], before[k]) for k in before)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[2].read_bytes()[:-40])  # the header intact, the last tensor's bytes cut short
    with pytest.raises((SoupError, OSError)):
        acc.add(truncated)
    assert acc.count == 1 and all(torch.equal(acc.result(F32)[k], before[k]) for k in before)
    assert_soup_close(acc.add(paths[1]).result()["a"], [states[0]["a"], states[1]["a"]], [1.0, 1.0], "a")

    patch_soup(monkeypatch, "_pread_into", failing)
    calls.clear()
    empty = SoupAccumulator()
    with pytest.raises(OSError, match="simulated"):
        empty.add(paths[0])
    patch_soup(monkeypatch, "_pread_into", real)
    assert empty.count == 0
    assert_soup_close(empty.add(paths[2]).result()["b"], [states[2]["b"]], [1.0], "b")


def test_accumulator_refuses_use_after_a_failure_it_could_not_undo(tmp_path, monkeypatch):
    """A read that fails only on the second pass (the file changed between the check and the sum) leaves a partial
    sum: the accumulator says so on every later call instead of returning a wrong soup."""
    states = [{"a": torch.full((64,), float(k)), "b": torch.ones(32) * k} for k in range(2)]
    paths = [save(tmp_path / f"m{k}.safetensors", sd) for k, sd in enumerate(states)]
    acc = SoupAccumulator().add(paths[0])
    real, calls = S._stream._pread_into, []

    def failing_late(fd, view, offset, path):
        calls.append(path)
        if len(calls) == 4:  # pass 1 read a and b; pass 2 added a, then b fails
            raise OSError(5, "disk gone (simulated)")
        real(fd, view, offset, path)

    patch_soup(monkeypatch, "_pread_into", failing_late)
    with pytest.raises(OSError, match="disk gone"):
        acc.add(paths[1])
    for call in (acc.result, lambda: acc.add(states[0]), lambda: acc.load_into(torch.nn.Linear(1, 1))):
        with pytest.raises(RuntimeError, match="adding .*m1.safetensors failed midway"):
            call()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_soup_leaves_temporaries_that_the_next_soup_removes(tmp_path):
    """SIGKILL mid-write: no output, a hidden temporary beside it. The next soup to the same output removes the
    temporaries of dead runs -- never those of a live process or of another host sharing the folder."""
    g = torch.Generator().manual_seed(11)
    inputs = [make_folder(tmp_path / f"m{i}", {"w": torch.randn(4096, generator=g)}) for i in range(2)]
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, kalm_fast.soup as S, kalm_fast.soup._files as F
        F._copy_side_files = lambda *a, **k: (print("written", flush=True), time.sleep(120))
        S.soup([{str(inputs[0])!r}, {str(inputs[1])!r}], {str(out)!r})
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"  # the shards are in the temporary folder
        child.kill()
        child.wait(30)
    finally:
        child.kill()
    dead = _hidden(tmp_path)
    assert not out.exists() and len(dead) == 1 and dead[0].startswith(".out.kalm-soup-new-")
    live = tmp_path / f".out.kalm-soup-new-{FILES._HOST}-{os.getpid()}-0123abcd"  # this test's own (live) process
    other = tmp_path / f".out.kalm-soup-new-otherhost-{child.pid}-0123abcd"  # same pid, another machine
    live.mkdir()
    other.mkdir()
    soup(inputs, out)
    assert _hidden(tmp_path) == sorted([live.name, other.name])
    assert_soup_close(load_file(out / "model.safetensors")["w"],
                      [load_file(i / "model.safetensors")["w"] for i in inputs], [1.0, 1.0], "w")


def test_crash_between_the_two_renames_keeps_the_old_output(tmp_path):
    """A run killed after moving the old output aside but before renaming the new one in: the old output is the only
    complete one, and the next soup to that output puts it back before it writes."""
    g = torch.Generator().manual_seed(12)
    inputs = [make_folder(tmp_path / f"m{i}", {"w": torch.randn(64, generator=g)}) for i in range(2)]
    out = soup(inputs, tmp_path / "out")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    aside = tmp_path / f".out.kalm-soup-old-{FILES._HOST}-{dead_pid}-0123abcd"
    os.rename(out, aside)
    assert FILES._clean_stale_temps(out) == [] and out.is_dir() and not aside.exists()
    os.rename(out, aside)  # now beside a complete output: a leftover
    soup(inputs, out, overwrite=True)
    assert out.is_dir() and not aside.exists() and _hidden(tmp_path) == []


def test_greedy_soup_keeps_only_improving_candidates(tmp_path):
    """Four noisy copies of a target (each averaging step lowers the noise) and two biased ones (which hurt):
    the greedy soup starts from the best single candidate, takes the noisy copies, refuses the biased ones."""
    g = torch.Generator().manual_seed(6)
    target = torch.randn(256, generator=g)
    good = [{"w": target + 0.1 * torch.randn(256, generator=g)} for _ in range(4)]
    bad = [{"w": target + 0.3 + 0.01 * torch.randn(256, generator=g)} for _ in range(2)]
    candidates: list = [good[0], bad[0], good[1], bad[1], good[2], good[3]]
    candidates[2] = save(tmp_path / "c2.safetensors", good[1])  # a path candidate

    def evaluate(state):
        return -torch.linalg.vector_norm(state["w"].float() - target).item()

    result = greedy_soup(candidates, evaluate)
    individual = [evaluate(load_file(c) if isinstance(c, Path) else c) for c in candidates]
    assert result.scores == individual
    assert result.chosen[0] == max(range(6), key=lambda i: individual[i])
    assert sorted(result.chosen) == [0, 2, 4, 5]
    assert_soup_close(result.state_dict["w"], [g["w"] for g in good], [1.0] * 4, "w")
    assert result.score == evaluate(result.state_dict) > max(individual)


def test_greedy_soup_scores_every_candidate_as_it_scores_the_soups(tmp_path):
    """evaluate receives the candidates' own state dicts as it receives the soups: on ``device`` in ``dtype`` (a
    file candidate was scored as read, fp32 on the CPU, while the soups came in the asked dtype on the device)."""
    g = torch.Generator().manual_seed(7)
    candidates = [{"w": torch.randn(64, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    candidates[1] = save(tmp_path / "c1.safetensors", candidates[1])
    seen = []

    def evaluate(state):
        seen.append({n: (t.dtype, t.device.type) for n, t in state.items()})
        return -state["w"].float().abs().sum().item()

    greedy_soup(candidates, evaluate, dtype=torch.bfloat16)
    assert len(seen) == 5 and all(s == {"w": (torch.bfloat16, "cpu"), "b": (torch.bfloat16, "cpu")} for s in seen)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli_soup_end_to_end(mixed, tmp_path, capsys):
    paths, _ = mixed
    out = tmp_path / "cli.safetensors"
    argv = ["soup", *map(str, paths), "-o", str(out), "--weights", *map(str, WEIGHTS), "--dtype", "fp32"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "soup" in captured.err  # the progress bar
    api = kalm_fast.soup(paths, tmp_path / "api.safetensors", weights=WEIGHTS, dtype="fp32")  # callable module
    assert out.read_bytes() == api.read_bytes()

    assert cli.main(argv + ["-q"]) == 1  # exists
    err = capsys.readouterr().err
    assert err.startswith("kalm-fast soup: error: output") and "--overwrite" in err and "Traceback" not in err
    assert cli.main(argv + ["-q", "--overwrite"]) == 0

    proc = subprocess.run([sys.executable, "-m", "kalm_fast.cli", "soup", str(paths[0]), str(tmp_path / "missing"),
                           "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "kalm-fast soup: error: cannot soup these inputs" in proc.stderr and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# GPU (CUDA kernels against the CPU path, bit for bit)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 4096])
def test_cuda_soup_equals_cpu(mixed, tmp_path, monkeypatch, chunk):
    paths, _ = mixed
    if chunk:  # many groups: the pinned-buffer / copy-stream pipeline turns over many times
        patch_soup(monkeypatch, "_CHUNK_CUDA", chunk)
    for dtype in (None, "fp32"):
        cpu = soup(paths, tmp_path / f"cpu{dtype}.safetensors", weights=WEIGHTS, dtype=dtype)
        gpu = soup(paths, tmp_path / f"gpu{dtype}.safetensors", weights=WEIGHTS, dtype=dtype, device="cuda")
        assert gpu.read_bytes() == cpu.read_bytes(), dtype


def _many_tensors(seed: int, device) -> dict:
    """150 tensors (more than one launch's table), odd sizes, a 100k-element one spanning chunks, and views whose
    addresses are not 16-byte aligned (the scalar path)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(150):
        dtype = [BF16, F16, F32][k % 3]
        n = [1, 7, 8, 9, 1000, 4097][k % 6] + k
        base = torch.randn(n + 1, generator=g).to(dtype).to(device)
        out[f"t{k}"] = base[1:] if k % 4 == 0 else base[:n]
    out["big"] = torch.randn(100_003, generator=g).to(BF16).to(device)
    # NaN of either sign and other payloads, Inf of both signs (Inf - Inf across inputs): 4,101 elements, the vector
    # path and a scalar tail
    special = torch.tensor([0x7FC1, 0xFFC0, 0x7F81, 0x7F80, 0xFF80], dtype=torch.int32).to(torch.int16).view(BF16)
    noise = torch.randn(4096, generator=g).to(BF16)
    out["special"] = torch.cat([special.roll(seed), noise])[torch.randperm(4101, generator=g)].to(device)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.gpu
@pytest.mark.parametrize("compensated", [False, True])
def test_cuda_accumulator_equals_cpu(compensated):
    states = [_many_tensors(s, "cuda") for s in range(3)]
    gpu, cpu = SoupAccumulator("cuda", compensated), SoupAccumulator("cpu", compensated)
    for sd, w in zip(states, WEIGHTS):
        gpu.add(sd, weight=w)
        cpu.add({k: v.cpu() for k, v in sd.items()}, weight=w)
    for dtype in (None, F32):
        got, want = gpu.result(dtype), cpu.result(dtype)
        bad = [k for k in want if not torch.equal(_bits(got[k].cpu()), _bits(want[k]))]  # NaN bits too
        assert not bad, f"CUDA != CPU for {bad[:5]}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_fallback_equals_kernels(disable_ext, device):
    """The torch fallback against the extension's kernels, bit for bit (NaN included), with a weight that is not an
    fp32 (0.7) in the compensated sum."""
    states = [_many_tensors(s, device) for s in range(2)]
    kernel = SoupAccumulator(device, compensated=True)
    for sd in states:
        kernel.add(sd, weight=0.7)
    disable_ext()
    with pytest.warns(RuntimeWarning, match="torch fallback"):
        fallback = SoupAccumulator(device, compensated=True)
    for sd in states:
        fallback.add(sd, weight=0.7)
    for dtype in (None, F32):
        got, want = fallback.result(dtype), kernel.result(dtype)
        bad = [k for k in want if not torch.equal(_bits(got[k]), _bits(want[k]))]
        assert not bad, f"torch fallback != kernels for {bad[:5]}"


@pytest.mark.gpu
def test_cuda_available_implies_extension_with_cuda():
    ext = K._load_ext()
    assert ext is not None and ext.compiled_with_cuda, "build kalm_fast._C with nvcc on the GPU machine"
    assert shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
