"""Hard-negative mining (``kalm-fast mine``): negatives from ranks [rank_start, rank_end) of the previous model.

KaLM-Embedding-V2 mines hard negatives from a middle band of the ranking (ranks 50-100): the very top ranks hold too
many unlabeled positives (false negatives), lower ranks are too easy. The ranking-consistency filter drops a row
whose own positive the model does not place in its top ``consistency_top_k``: such a pair is likely noisy, and its
"hard negatives" would be drawn relative to a ranking that already disagrees with the label.

The corpus is every distinct positive (and existing negative) of the input file; a document equal to the row's
positive is never its negative. Output rows keep every input field, with ``neg`` replaced; written atomically.

Under torchrun every rank mines a share: rank 0 reads the corpus and hands each rank its contiguous share of the
documents (and the positives of its share of the rows); each rank embeds its documents and queries, then the document
shares are broadcast one at a time and every rank keeps a running top-k of its queries against them (no rank holds
the whole corpus embedding); rank 0 gathers, per row, the consistency verdict and the rank band, and draws the
negatives in row order with the seeded generator, as one process does.
"""

from __future__ import annotations

import bisect
import json
import random
from pathlib import Path

import torch

from kalm_fast.atomic import writing
from kalm_fast.distributed import broadcast_rows, gather_rows, rank_share, scatter_objects, world
from kalm_fast.model import Embedder, query_prompt
from kalm_fast.train.config import MineConfig, RecipeError
from kalm_fast.train.data import checked_rows, iter_rows, open_rows

MAX_SCORES = 2**26  # scores a block of queries makes at once (256 MB fp32 on the embedder's device)


def _best_first(values: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of (values, idx) rows ordered best first, equal values by index (lower first): the
    same order on every device and torch version."""
    idx, order = idx.sort(dim=1)
    values = values.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), idx.gather(1, order)


def _top_blocks(q: torch.Tensor, docs: torch.Tensor, k: int, device, max_scores: int, offset: int = 0):
    """(values fp32, indices int64) (Q, k) on CPU of the top ``k`` documents per query, best first, indices + offset."""
    Q, C = q.shape[0], docs.shape[0]
    docs = docs.to(device)
    rows = max(1, min(1024, max_scores // C))
    values, out = torch.empty(Q, k), torch.empty(Q, k, dtype=torch.int64)
    for start in range(0, Q, rows):
        v, i = _best_first(*(q[start:start + rows].to(device) @ docs.T).topk(k, dim=1, sorted=False), k)
        values[start:start + rows], out[start:start + rows] = v.cpu(), i.cpu() + offset
    return values, out


def top_ranked(q: torch.Tensor, docs: torch.Tensor, k: int, *, device=None,
               max_scores: int = MAX_SCORES) -> torch.Tensor:
    """(Q, k) int64 on CPU: row i holds the indices of the ``k`` documents scoring highest against query i (``q @
    docs.T``), best first.

    Scores are made on ``device`` (the documents are copied there once) in blocks of at most 1,024 queries and
    ``max_scores`` scores, and only the top ``k`` of each block leaves the device: memory O(C) per query instead of
    the full (Q, C) ranking, and a top-k instead of a sort of every row (a 1M-document corpus is 4 MB of scores
    per query, not 12 MB of scores and sorted indices). Equal scores rank by document index (lower first); which of
    equal scores at rank ``k`` is kept is ``torch.topk``'s choice."""
    C = docs.shape[0]
    if not 1 <= k <= C:
        raise ValueError(f"k must be in [1, {C}] (the number of documents), got {k}")
    if max_scores < 1:
        raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    return _top_blocks(q, docs, k, docs.device if device is None else torch.device(device), max_scores)[1]


def _top_ranked_sharded(q: torch.Tensor, docs: torch.Tensor, num_docs: int, k: int, device) -> torch.Tensor:
    """``top_ranked`` of this rank's queries against every rank's document share (rank r holds the documents
    ``rank_share(num_docs)`` gives it, here ``docs``): the shares are broadcast one at a time and merged into a
    running top-k, so a rank holds one share, not the corpus."""
    _, size = world()
    if size == 1:
        return top_ranked(q, docs, k, device=device)
    values = torch.empty(q.shape[0], 0)
    idx = torch.empty(q.shape[0], 0, dtype=torch.int64)
    for r in range(size):
        share = rank_share(num_docs, r)
        block = broadcast_rows(docs, src=r, rows=len(share))
        if not len(share):
            continue
        v, i = _top_blocks(q, block, min(k, len(share)), device, MAX_SCORES, offset=share.start)
        values, idx = _best_first(torch.cat([values, v], 1), torch.cat([idx, i], 1), k)
    return idx


def _corpus(ds, keep, input_path) -> tuple[list[str], list[int]]:
    """Check every row; the sorted distinct documents (positives and negatives) of the kept rows, and each kept row's
    positive as an index into them."""
    kept = bytearray(len(ds))
    for i in keep:
        kept[i] = 1
    texts = set()
    pos_text = []
    for i, _, pos, negs in checked_rows(ds, input_path, "mine input", 0):
        if kept[i]:
            texts.add(pos)
            texts.update(negs)
            pos_text.append(pos)
    corpus = sorted(texts)
    return corpus, [bisect.bisect_left(corpus, t) for t in pos_text]


def mine(embedder: Embedder, input_path: str | Path, output_path: str | Path, cfg: MineConfig, *, seed: int = 0,
         max_length: int | None = None) -> dict:
    """Mine ``cfg.num_negatives`` negatives per row of ``input_path`` into ``output_path``; returns counts.

    Distributed (torchrun), every rank must call it: each embeds and ranks its share, rank 0 writes the output and
    returns the counts, the other ranks return {} (the caller waits for rank 0 before reading the output)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise RecipeError(f"mine: output {output_path} would overwrite the input")
    rank, size = world()
    # the rows are streamed from the file's Arrow table (data.open_rows): no rank holds them all as Python objects
    ds = open_rows(input_path, "mine input", None)
    rng = random.Random(f"mine:{seed}")
    keep = range(len(ds))
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        keep = sorted(rng.sample(range(len(ds)), cfg.max_rows))

    # rank 0 reads the corpus and sends each rank its documents and its rows' positives (or the error, so that no
    # rank waits for a share that never comes)
    shares = corpus = kept_pos = None
    if rank == 0:
        try:
            corpus, kept_pos = _corpus(ds, keep, input_path)
            if len(corpus) <= cfg.rank_start:
                raise RecipeError(f"mine: the corpus of {input_path} has {len(corpus)} distinct documents, fewer "
                                  f"than rank_start={cfg.rank_start}: lower rank_start/rank_end")
            shares = [(len(corpus), [corpus[i] for i in rank_share(len(corpus), r)],
                       [kept_pos[j] for j in rank_share(len(keep), r)]) for r in range(size)]
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank
            if size == 1:
                raise
            shares = [e] * size
    share = scatter_objects(shares)
    if isinstance(share, Exception):
        raise share
    num_docs, doc_texts, pos_ids = share
    docs = embedder.encode(doc_texts, batch_size=cfg.batch_size, max_length=max_length, show_progress_bar=rank == 0)
    del doc_texts

    # this rank's queries, grouped by prompt (instructions may differ per row)
    mine_rows = [keep[j] for j in rank_share(len(keep))]
    rows = ds.select(mine_rows).select_columns([c for c in ("query", "instruction") if c in ds.column_names])
    q = torch.empty(len(mine_rows), docs.shape[1])
    by_prompt: dict[str | None, list[int]] = {}
    queries = []
    for j, row in iter_rows(rows):
        queries.append(row["query"])
        by_prompt.setdefault(query_prompt(row.get("instruction") or cfg.instruction), []).append(j)
    for prompt, idx in by_prompt.items():
        q[idx] = embedder.encode([queries[j] for j in idx], prompt=prompt, batch_size=cfg.batch_size,
                                 max_length=max_length)
    del queries

    # per row: whether the positive is in the top consistency_top_k, and the rank band without the positive (-1)
    end = min(cfg.rank_end, num_docs)
    k = min(num_docs, max(end, cfg.consistency_top_k))
    ranked = _top_ranked_sharded(q, docs, num_docs, k, embedder.device)
    pos = torch.tensor(pos_ids, dtype=torch.int64)[:, None]
    band = ranked[:, cfg.rank_start:end]
    verdicts = torch.cat([(ranked[:, :cfg.consistency_top_k] == pos).any(1, keepdim=True).to(torch.int32),
                          torch.where(band == pos, -1, band).to(torch.int32)], 1)
    del ranked
    verdicts = gather_rows(verdicts)
    if rank != 0:
        return {}

    kept_rows, inconsistent, too_few = 0, 0, 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with writing(output_path) as f:
        for j, row in iter_rows(ds.select(keep)):  # every field of the kept rows, in order
            if j % 4096 == 0:  # Python lists of 4,096 verdicts at a time
                chunk = verdicts[j:j + 4096].tolist()
            consistent, *band_ids = chunk[j % 4096]
            if not consistent:
                inconsistent += 1
                continue
            band = [corpus[d] for d in band_ids if d >= 0]
            if len(band) < cfg.num_negatives:
                too_few += 1
                continue
            row["pos"] = corpus[kept_pos[j]]  # the checked positive (the first one of a list)
            f.write(json.dumps({**row, "neg": rng.sample(band, cfg.num_negatives)}, ensure_ascii=False) + "\n")
            kept_rows += 1
        if not kept_rows:  # inside the block: nothing is published
            raise RecipeError(f"mine: no row of {input_path} passed the ranking-consistency filter (top "
                              f"{cfg.consistency_top_k}); raise consistency_top_k")
    stats = {"rows": len(keep), "kept": kept_rows, "dropped_inconsistent": inconsistent,
             "dropped_too_few": too_few, "corpus": len(corpus)}
    print(f"[mine] {output_path}: kept {kept_rows}/{len(keep)} rows ({inconsistent} failed the top-"
          f"{cfg.consistency_top_k} consistency filter), {cfg.num_negatives} negatives each from ranks "
          f"{cfg.rank_start}-{end} of {len(corpus)} documents")
    return stats
