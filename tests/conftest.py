"""Shared test set-up. Without CUDA the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
any @triton.jit decorator runs, i.e. before kalm_fast.kernels is imported, hence here."""

import contextlib
import datetime
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def import_bench(name: str):
    """``bench.<name>`` (or ``bench`` for ""): bench/ is a folder of the repository, not part of the installed
    package, so it is imported from the root, which then leaves sys.path again -- left there it would make the
    repository's top-level `kernels` folder importable, which transformers mistakes for the kernel hub (test_build
    checks that it is not)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"bench.{name}" if name else "bench")
    finally:
        sys.path.remove(str(ROOT))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def cu_seqlens_of(lengths, device=DEVICE) -> torch.Tensor:
    """int32 (B+1,) boundaries of packed sequences of these lengths (B may be 0)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def packed_qkv(lengths, Hq, Hkv, D, dtype, device=DEVICE):
    """Random packed (T, H, D) q, k, v leaves for sequences of these lengths, their cu_seqlens and max length."""
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, device=device, dtype=dtype).requires_grad_() for h in (Hq, Hkv, Hkv))
    return q, k, v, cu_seqlens_of(lengths, device), max(lengths, default=0)


@contextlib.contextmanager
def gloo_group(rank: int, init_file: str, world_size: int, timeout_s: float):
    """A spawned worker's default gloo group, met through init_file; destroyed on the way out, error or not."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real Qwen2Tokenizer with a byte-level vocabulary (one token per UTF-8 byte, 257 ids, no merges): it saves
    and reloads as itself, which a foreign tokenizer next to a Qwen2 config does not in transformers 5."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return Qwen2Tokenizer(vocab={"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """allclose that prints the first mismatches (Liger-Kernel style)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:8]
        rows = [f"  {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
                for i in idx]
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (max abs err {err:.3g}, "
                             f"atol={atol}, rtol={rtol})\n" + "\n".join(rows))
