"""Exact cosine top-k over the enrolled people: one float32 matrix, searched by matrix products.

Rows are unit-length person aggregates, so a dot product is the cosine. Queries go through in
batches and the gallery in blocks, so the score matrix in memory stays at most
QUERY_BATCH x GALLERY_BLOCK floats whatever the gallery's size: 1M people x 128 dimensions is
512 MB of matrix and a 256 x 65,536 block of scores (64 MB). Past a few million people (or at
thousands of queries per second) an approximate index (IVF-PQ, HNSW) would take over; see the
README's gallery section.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facedist.gallery.embedding import aggregate

QUERY_BATCH = 256
GALLERY_BLOCK = 65_536


@dataclass
class Match:
    person: str
    score: float


class GalleryIndex:
    """names[i] is the person of matrix row i (unit rows, float32, C-contiguous)."""

    def __init__(self, names: list[str], matrix: np.ndarray):
        self.names = list(names)
        self.matrix = np.ascontiguousarray(matrix, np.float32)
        if self.matrix.ndim != 2 or len(self.names) != len(self.matrix):
            raise ValueError(f"{len(self.names)} names for a matrix of shape {self.matrix.shape}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k'), rows (Q, k')) of the k' = min(k, people) best rows per query, best
        first; exact."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        k = min(k, len(self))
        scores = np.zeros((len(queries), k), np.float32)
        rows = np.zeros((len(queries), k), np.int64)
        if k == 0:
            return scores, rows
        for start in range(0, len(queries), QUERY_BATCH):
            q = queries[start:start + QUERY_BATCH]
            best_s = np.full((len(q), 0), -np.inf, np.float32)
            best_i = np.zeros((len(q), 0), np.int64)
            for block in range(0, len(self), GALLERY_BLOCK):
                s = q @ self.matrix[block:block + GALLERY_BLOCK].T
                kk = min(k, s.shape[1])
                top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else \
                    np.broadcast_to(np.arange(s.shape[1]), s.shape)
                # Merge this block's best with the best so far, keep k.
                cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
                cand_i = np.concatenate([best_i, top + block], 1)
                keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
                best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
            scores[start:start + len(q)], rows[start:start + len(q)] = best_s, best_i
        return scores, rows

    def top(self, query: np.ndarray, k: int = 5) -> list[Match]:
        """One query's best k people."""
        scores, rows = self.search(query[None], k)
        return [Match(self.names[r], float(s)) for s, r in zip(scores[0], rows[0])]


def identify(index, model, embeddings: np.ndarray, top_k: int) -> dict:
    """Photos of one person (unit embeddings) -> {"identity", "score", "top_k": [{person, score}]}:
    the probe's aggregate against every enrolled person, "unknown" when the best is below the
    open-set threshold for this many people (EmbeddingModel.open_set_threshold). The one copy of
    the decision (CLI, HTTP, `facedist predict --gallery`)."""
    matches = index.top(aggregate(embeddings), top_k) if len(index) else []
    best = matches[0] if matches else None
    threshold = model.open_set_threshold(len(index))
    known = best is not None and best.score >= threshold
    return {"identity": best.person if known else "unknown", "score": best.score if best else None,
            "threshold": threshold, "n_photos": int(len(embeddings)),
            "top_k": [{"person": m.person, "score": m.score} for m in matches]}


def verify(model, a: np.ndarray, b: np.ndarray) -> dict:
    """Two sets of photos -> {"same", "score", "threshold"}: the cosine of their aggregates."""
    score = float(aggregate(a) @ aggregate(b))
    return {"same": score >= model.threshold, "score": score, "threshold": model.threshold,
            "n_photos": [int(len(a)), int(len(b))]}


def match_rows(model, index: GalleryIndex, rows: list[dict]) -> list[tuple[str | None, float | None]]:
    """Each extraction row's photo on its own against the gallery: (the top-1 person, or "unknown"
    below the open-set threshold, and its score); (None, None) for a row with no embedding
    (`facedist predict --gallery`)."""
    out: list[tuple[str | None, float | None]] = [(None, None)] * len(rows)
    embeddings, have, _ = model.embed_rows(rows)
    if not have or not len(index):
        return out
    scores, best = index.search(embeddings, 1)
    threshold = model.open_set_threshold(len(index))
    for slot, i in enumerate(have):
        score = float(scores[slot, 0])
        out[i] = (index.names[best[slot, 0]] if score >= threshold else "unknown", score)
    return out
