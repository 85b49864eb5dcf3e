"""Hard-negative mining (``kalm-fast mine``): negatives from ranks [rank_start, rank_end) of the previous model.

KaLM-Embedding-V2 mines hard negatives from a middle band of the ranking (ranks 50-100): the very top ranks hold too
many unlabeled positives (false negatives), lower ranks are too easy. The ranking-consistency filter drops a row
whose own positive the model does not place in its top ``consistency_top_k``: such a pair is likely noisy, and its
"hard negatives" would be drawn relative to a ranking that already disagrees with the label.

The corpus is every distinct positive (and existing negative) of the input file; a document equal to the row's
positive is never its negative. Output rows keep every input field, with ``neg`` replaced; written atomically.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from kalm_fast.distributed import gather_rows, rank_share, world
from kalm_fast.model import Embedder, query_prompt
from kalm_fast.train.config import MineConfig, RecipeError
from kalm_fast.train.data import checked_row, iter_rows, open_rows


def top_ranked(q: torch.Tensor, docs: torch.Tensor, k: int, *, device=None, max_scores: int = 2**26) -> torch.Tensor:
    """(Q, k) int64 on CPU: row i holds the indices of the ``k`` documents scoring highest against query i (``q @
    docs.T``), best first.

    Scores are made on ``device`` (the documents are copied there once) in blocks of at most 1,024 queries and
    ``max_scores`` scores, and only the top ``k`` of each block leaves the device: memory O(C) per query instead of
    the full (Q, C) ranking, and a top-k instead of a sort of every row (a 1M-document corpus is 4 MB of scores
    per query, not 12 MB of scores and sorted indices). Equal scores rank by document index (lower first); which of
    equal scores at rank ``k`` is kept is ``torch.topk``'s choice."""
    Q, C = q.shape[0], docs.shape[0]
    if not 1 <= k <= C:
        raise ValueError(f"k must be in [1, {C}] (the number of documents), got {k}")
    if max_scores < 1:
        raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    device = docs.device if device is None else torch.device(device)
    docs = docs.to(device)
    rows = max(1, min(1024, max_scores // C))
    out = torch.empty(Q, k, dtype=torch.int64)
    for start in range(0, Q, rows):
        values, idx = (q[start:start + rows].to(device) @ docs.T).topk(k, dim=1, sorted=False)
        # best first, equal scores by document index: the same order on every device and torch version
        idx, order = idx.sort(dim=1)
        values = values.gather(1, order)
        out[start:start + rows] = idx.gather(1, values.sort(dim=1, descending=True, stable=True).indices).cpu()
    return out


def mine(embedder: Embedder, input_path: str | Path, output_path: str | Path, cfg: MineConfig, *, seed: int = 0,
         max_length: int | None = None) -> dict:
    """Mine ``cfg.num_negatives`` negatives per row of ``input_path`` into ``output_path``; returns counts.

    Distributed (torchrun), every rank must call it: each embeds and ranks its share, rank 0 writes the output and
    returns the counts, the other ranks return {} (the caller waits for rank 0 before reading the output)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise RecipeError(f"mine: output {output_path} would overwrite the input")
    # the rows are streamed from the file's Arrow table (data.open_rows): no rank holds them all as Python objects
    ds = open_rows(input_path, "mine input", None)
    rng = random.Random(f"mine:{seed}")
    keep = range(len(ds))
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        keep = sorted(rng.sample(range(len(ds)), cfg.max_rows))
    kept = bytearray(len(ds))
    for i in keep:
        kept[i] = 1
    texts = set()
    columns = [c for c in ("query", "pos", "neg") if c in ds.column_names]
    for i, row in iter_rows(ds, columns):  # every row is checked, the kept rows' documents collected
        pos, negs = checked_row(row, i, input_path, "mine input", 0)
        if kept[i]:
            texts.add(pos)
            texts.update(negs)
    corpus = sorted(texts)
    del texts
    if len(corpus) <= cfg.rank_start:
        raise RecipeError(f"mine: the corpus of {input_path} has {len(corpus)} distinct documents, fewer than "
                          f"rank_start={cfg.rank_start}: lower rank_start/rank_end")
    rank = world()[0]
    # under torchrun every rank embeds its share of the corpus and of the queries (rank_share: contiguous, in rank
    # order) and ranks its queries against the whole corpus; rank 0 draws the negatives from the gathered rankings
    # in row order, so the seeded draw is the one a single process makes
    docs = gather_rows(embedder.encode([corpus[i] for i in rank_share(len(corpus))], batch_size=cfg.batch_size,
                                       max_length=max_length, show_progress_bar=rank == 0), to_all=True)
    mine_rows = [keep[j] for j in rank_share(len(keep))]
    share = ds.select(mine_rows).select_columns([c for c in ("query", "instruction") if c in ds.column_names])
    # queries grouped by prompt (instructions may differ per row)
    q = torch.empty(len(mine_rows), docs.shape[1])
    by_prompt: dict[str | None, list[int]] = {}
    queries = []
    for j, row in iter_rows(share):
        queries.append(row["query"])
        by_prompt.setdefault(query_prompt(row.get("instruction") or cfg.instruction), []).append(j)
    for prompt, idx in by_prompt.items():
        q[idx] = embedder.encode([queries[j] for j in idx], prompt=prompt, batch_size=cfg.batch_size,
                                 max_length=max_length)
    del queries

    end = min(cfg.rank_end, len(corpus))
    k = min(len(corpus), max(end, cfg.consistency_top_k))
    ranked = gather_rows(top_ranked(q, docs, k, device=embedder.device), to_all=False)
    if rank != 0:
        return {}
    doc_id = {t: i for i, t in enumerate(corpus)}
    kept_rows, inconsistent, too_few = 0, 0, 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for j, row in iter_rows(ds.select(keep)):  # every field of the kept rows, in order
            if j % 4096 == 0:  # Python lists of 4,096 rankings at a time
                orders = ranked[j:j + 4096].tolist()
            order = orders[j % 4096]
            row["pos"], row["neg"] = checked_row(row, j, input_path, "mine input", 0)
            pos = doc_id[row["pos"]]
            if pos not in order[:cfg.consistency_top_k]:
                inconsistent += 1
                continue
            band = [corpus[d] for d in order[cfg.rank_start:end] if d != pos]
            if len(band) < cfg.num_negatives:
                too_few += 1
                continue
            f.write(json.dumps({**row, "neg": rng.sample(band, cfg.num_negatives)}, ensure_ascii=False) + "\n")
            kept_rows += 1
    if not kept_rows:
        tmp.unlink()
        raise RecipeError(f"mine: no row of {input_path} passed the ranking-consistency filter (top "
                          f"{cfg.consistency_top_k}); raise consistency_top_k")
    os.replace(tmp, output_path)
    stats = {"rows": len(keep), "kept": kept_rows, "dropped_inconsistent": inconsistent,
             "dropped_too_few": too_few, "corpus": len(corpus)}
    print(f"[mine] {output_path}: kept {kept_rows}/{len(keep)} rows ({inconsistent} failed the top-"
          f"{cfg.consistency_top_k} consistency filter), {cfg.num_negatives} negatives each from ranks "
          f"{cfg.rank_start}-{end} of {len(corpus)} documents")
    return stats
