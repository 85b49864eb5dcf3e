"""SoupAccumulator (in-memory averaging during training) and greedy_soup (Wortsman et al. 2022)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kalm_fast.soup._checks import _as_device, _as_dtype, _as_weight, _fp32
from kalm_fast.soup._format import _FLOAT, _ST_NAME, SoupError, _Checkpoint, _open_checkpoint
from kalm_fast.soup._kernels import _Kernels
from kalm_fast.soup._stream import _pread_into

# ----------------------------------------------------------------------------------------------------------------
# SoupAccumulator: in-memory averaging (training), and greedy soups
# ----------------------------------------------------------------------------------------------------------------


class SoupAccumulator:
    """Weighted average of state dicts held in memory: ``sum_i w_i x_i / sum_i w_i`` accumulated in fp32.

        acc = SoupAccumulator(device="cuda", compensated=True)
        for ckpt in checkpoints:
            acc.add(ckpt, weight=1.0)            # a state dict, an nn.Module, a .safetensors file or a HF folder
        acc.load_into(model)                     # or acc.result(torch.bfloat16) -> {name: tensor}

    Holds one fp32 tensor per parameter on ``device`` (two with ``compensated=True``: a Kahan-Babuska-Neumaier
    compensation, with exact products of bf16/fp16 inputs, so the error stays at a few fp32 roundings of the result
    instead of growing with the number of checkpoints and with cancellation between them).
    The first ``add`` fixes the names, shapes and default result dtypes; later ones must match (one SoupError lists
    every mismatch, found before anything is added). Only F32/F16/BF16 tensors can be averaged.
    """

    def __init__(self, device: str | torch.device = "cpu", compensated: bool = False):
        self.device = _as_device(device)
        self.compensated = bool(compensated)
        self._kernels = _Kernels(self.device)
        self._acc: dict[str, torch.Tensor] = {}
        self._comp: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._weight_sum = 0.0  # of the fp32-rounded weights
        self.count = 0  # checkpoints added with a positive weight
        self._broken = ""  # why the accumulator is unusable (an add that failed after changing it), else ""

    @property
    def total_weight(self) -> float:
        return self._weight_sum

    def add(self, source, weight: float = 1.0) -> SoupAccumulator:
        """Adds ``weight * source``; source: a state dict (name -> tensor), an nn.Module or a checkpoint path. A
        source that cannot be read or does not match leaves the soup as it was."""
        self._usable()
        weight = _fp32(_as_weight(weight, "weight"))
        if isinstance(source, (str, os.PathLike)):
            ck = _open_checkpoint(Path(source))
            problems = self._check({n: (t.shape, t.dtype) for n, t in ck.tensors.items()}, str(source))
            if problems:
                raise SoupError(problems, "cannot add this checkpoint")
            if weight > 0:
                self._add_checkpoint(ck, weight)
            else:
                self._init({n: (t.shape, _FLOAT[t.dtype]) for n, t in ck.tensors.items()})
        else:
            state = source.state_dict() if isinstance(source, torch.nn.Module) else source
            if not isinstance(state, Mapping):
                raise TypeError(f"source must be a state dict, an nn.Module or a path, got {type(source).__name__}")
            bad = [n for n, t in state.items() if not isinstance(t, torch.Tensor)]
            if bad:
                raise TypeError(f"state dict values must be tensors; not tensors: {', '.join(map(str, bad))}")
            problems = self._check({n: (tuple(t.shape), _ST_NAME.get(t.dtype, str(t.dtype).removeprefix("torch.")))
                                    for n, t in state.items()}, "the state dict")
            if problems:
                raise SoupError(problems, "cannot add this state dict")
            self._init({n: (tuple(t.shape), t.dtype) for n, t in state.items()})
            if weight > 0:
                self._add_state(state, weight)
        if weight > 0:
            self._weight_sum += weight
            self.count += 1
        return self

    def _add_checkpoint(self, ck: _Checkpoint, weight: float) -> None:
        """All or nothing: every tensor is read once first, so a truncated or unreadable file raises with the soup
        untouched; then read again (the page cache usually serves it) into the accumulator one tensor at a time, in
        one reused buffer, so memory stays at one tensor. A read failing in that second pass (a file changed or a
        disk failed in between) leaves a partial sum that cannot be undone without a copy of the whole soup: the
        accumulator then refuses every further use, naming the failure."""
        for _ in _read_tensors(ck):
            pass
        self._init({n: (t.shape, _FLOAT[t.dtype]) for n, t in ck.tensors.items()})
        first = self.count == 0
        try:
            for name, t in _read_tensors(ck):
                self._kernels.accumulate([self._entry(name, t)], weight, first)
        except BaseException as e:
            self._broken = f"adding {ck.path} failed midway ({type(e).__name__}: {e}); the soup holds a partial sum"
            raise

    def _usable(self) -> None:
        if self._broken:
            raise RuntimeError(f"this SoupAccumulator cannot be used: {self._broken}")

    def _check(self, specs: Mapping[str, tuple[tuple[int, ...], str]], label: str) -> list[str]:
        problems = [f"{n!r} is {d} in {label}: only F32, F16 and BF16 tensors can be averaged"
                    for n, (_, d) in specs.items() if d not in _FLOAT]
        if self._shapes:
            missing = [n for n in self._shapes if n not in specs]
            extra = [n for n in specs if n not in self._shapes]
            if missing:
                problems.append(f"{label} lacks {len(missing)} tensor(s) of the soup: {', '.join(missing)}")
            if extra:
                problems.append(f"{label} has {len(extra)} tensor(s) not in the soup: {', '.join(extra)}")
            problems += [f"{n!r} has shape {list(s)} in {label} but {list(self._shapes[n])} in the soup"
                         for n, (s, _) in specs.items() if n in self._shapes and tuple(s) != self._shapes[n]]
        return problems

    def _init(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        if self._shapes:
            return
        for n, (shape, dtype) in specs.items():
            self._shapes[n], self._dtypes[n] = tuple(shape), dtype
            self._acc[n] = torch.empty(math.prod(shape), dtype=torch.float32, device=self.device)
            if self.compensated:
                self._comp[n] = torch.empty(math.prod(shape), dtype=torch.float32, device=self.device)

    def _entry(self, name: str, t: torch.Tensor):
        return self._acc[name], self._comp.get(name), t.detach().to(self.device).contiguous().reshape(-1)

    def _add_state(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """One multi-tensor kernel call per batch of <= 256 MB copied from another device (one call for all the
        tensors already on the accumulator's device)."""
        first = self.count == 0
        batch, moved = [], 0
        for name, t in state.items():
            batch.append(self._entry(name, t))
            moved += 0 if t.device == self.device else t.numel() * t.element_size()
            if moved >= 256 * 2**20:
                self._kernels.accumulate(batch, weight, first)
                batch, moved = [], 0
        self._kernels.accumulate(batch, weight, first)

    def result(self, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """The soup as {name: tensor} on ``device``, in ``dtype`` (default: the first checkpoint's, per tensor)."""
        dtype = _as_dtype(dtype)
        return self._result({n: dtype or d for n, d in self._dtypes.items()})

    def _result(self, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
        self._usable()
        if self._weight_sum == 0:
            raise ValueError("the soup is empty: no checkpoint with a positive weight was added")
        out = {n: torch.empty(self._shapes[n], dtype=dtypes[n], device=self.device) for n in self._shapes}
        self._kernels.cast([(self._acc[n], self._comp.get(n), out[n].view(-1)) for n in self._shapes],
                           _fp32(self._weight_sum))
        return out

    def load_into(self, module: torch.nn.Module, strict: bool = True) -> torch.nn.Module:
        """Loads the soup into ``module``, each tensor rounded once to the dtype of the module's own tensor."""
        own = module.state_dict()
        dtypes = {n: own[n].dtype if n in own and own[n].dtype in _ST_NAME else self._dtypes[n] for n in self._shapes}
        module.load_state_dict(self._result(dtypes), strict=strict)
        return module

    def copy(self) -> SoupAccumulator:
        """An independent accumulator with the same state (e.g. to try one more checkpoint)."""
        new = SoupAccumulator(self.device, self.compensated)
        new._acc = {n: t.clone() for n, t in self._acc.items()}
        new._comp = {n: t.clone() for n, t in self._comp.items()}
        new._shapes, new._dtypes = dict(self._shapes), dict(self._dtypes)
        new._weight_sum, new.count, new._broken = self._weight_sum, self.count, self._broken
        return new


def _read_tensors(ck: _Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a checkpoint, read file by file in offset order with pread into one reused buffer; each
    tensor is valid until the next one is yielded."""
    buf = torch.empty(max((t.nbytes for t in ck.tensors.values()), default=0), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    for header in ck.shards:
        fd = os.open(header.path, os.O_RDONLY)
        try:
            for t in header.tensors:
                _pread_into(fd, view[:t.nbytes], t.begin, t.path)
                yield t.name, buf[:t.nbytes].view(_FLOAT[t.dtype]).view(t.shape)
        finally:
            os.close(fd)


def _as_state_dict(candidate) -> dict[str, torch.Tensor]:
    if isinstance(candidate, torch.nn.Module):
        return candidate.state_dict()
    if isinstance(candidate, (str, os.PathLike)):
        ck = _open_checkpoint(Path(candidate))
        problems = [f"{n!r} is {t.dtype} in {candidate}: only F32, F16 and BF16 tensors can be averaged"
                    for n, t in ck.tensors.items() if t.dtype not in _FLOAT]
        if problems:
            raise SoupError(problems)
        return {n: t.clone() for n, t in _read_tensors(ck)}
    if isinstance(candidate, Mapping):
        return dict(candidate)
    raise TypeError(f"candidates must be state dicts, nn.Modules or paths, got {type(candidate).__name__}")


@dataclass
class GreedySoupResult:
    chosen: list[int]  # indices into candidates, in the order they joined the soup
    state_dict: dict[str, torch.Tensor]  # the uniform soup of the chosen candidates
    score: float  # evaluate(state_dict)
    scores: list[float]  # each candidate's own score


def greedy_soup(candidates: Sequence, evaluate: Callable[[dict[str, torch.Tensor]], float], *,
                device: str | torch.device = "cpu", compensated: bool = False,
                dtype: torch.dtype | str | None = None) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, "Model soups", Algorithm 1).

    Scores every candidate on its own with ``evaluate(state_dict) -> float`` (higher is better), visits them from the
    best score down, and keeps a candidate only if the uniform average of the soup plus it scores strictly higher
    than the soup so far (the paper keeps ties; here a tie does not improve, so it is left out). The soup starts
    from the best single candidate.

    Arguments:
        candidates: state dicts, nn.Modules or checkpoint paths (.safetensors files or Hugging Face folders), all
            with the same tensor names and shapes.
        evaluate: ``evaluate(state_dict) -> float``, higher is better; receives {name: tensor} on ``device`` in
            ``dtype``.
        device: where the soup is accumulated ("cpu" or "cuda").
        compensated: compensated fp32 sums (``SoupAccumulator(compensated=True)``).
        dtype: dtype of the state dicts ``evaluate`` receives (default: the first candidate's, per tensor).
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty")
    scores, dtypes = [], None
    for i, c in enumerate(candidates):
        state = _as_state_dict(c)
        if dtypes is None:  # what the soups' result(dtype) gives: dtype, else the first candidate's per tensor
            dtypes = {n: _as_dtype(dtype) or t.dtype for n, t in state.items()}
        # on ``device`` in those dtypes, as the soups are (a file candidate is read on the CPU in its own dtype)
        s = float(evaluate({n: t.to(device=device, dtype=dtypes.get(n, t.dtype)) for n, t in state.items()}))
        if not math.isfinite(s):
            raise ValueError(f"evaluate(candidates[{i}]) returned {s}; scores must be finite")
        scores.append(s)
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep the candidates' order
    soup_acc = SoupAccumulator(device, compensated).add(candidates[order[0]])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = soup_acc.copy().add(candidates[i])
        s = float(evaluate(trial.result(dtype)))
        if not math.isfinite(s):
            raise ValueError(f"evaluate(soup + candidates[{i}]) returned {s}; scores must be finite")
        if s > best:
            soup_acc, best = trial, s
            chosen.append(i)
    return GreedySoupResult(chosen, soup_acc.result(dtype), best, scores)
