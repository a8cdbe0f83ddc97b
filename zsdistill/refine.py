"""Label-free refinement of a teacher's targets in the cached text-embedding space (stage 2's default).

A zero-shot teacher's mistakes are systematic: it scores every text against a class *name*, so a class whose
name sits oddly in the model's space is under- or over-predicted everywhere. The texts themselves cluster
better than the names do. Refinement keeps the teacher's class semantics and replaces the name anchors with
centroids of the texts the teacher is surest about (confident self-training, in the spirit of X-Class and
Gera et al. 2022):

    P = teacher posteriors
    repeat (at most MAX_ROUNDS, until under MIN_CHANGE of the predictions move):
        per class k: keep the rows predicted k that are in the top KEEP_FRACTION of confidence among them
                     and that the teacher also puts in k (this anchor stops the clusters drifting to topics
                     of their own, which unanchored rounds do on hard tasks)
        centroid_k = normalised mean embedding of the kept rows; prior_k = mean of P[:, k]
        P = softmax_k(KAPPA * <x, centroid_k> + log prior_k)

No label is read: only the cache's teacher scores and text embeddings. Every setting is fixed for all data:
KAPPA is the scale the sentence-embedding models are trained with (the same 1/SIMILARITY_SCALE that turns
similarities into targets); KEEP_FRACTION and the anchor come from measurements on several labeled sets of
different sizes, class counts and balance (benchmarks/README.md), none of them tuned per set.

Memory: the embeddings are read in chunks from the memory-mapped cache (O(N*K) arrays plus one chunk).
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from zsdistill.targets import SIMILARITY_SCALE

METHOD = "confident-centroids"
KAPPA = 1.0 / SIMILARITY_SCALE
KEEP_FRACTION = 0.5
MAX_ROUNDS = 10
MIN_CHANGE = 0.001
FILE = "refinement.npz"  # in the student directory: lets evaluate.py show the refined teacher on a test cache

# () -> iterator of (start row, float32 array (rows, H) of L2-normalised embeddings), in row order.
EmbeddingChunks = Callable[[], Iterator[tuple[int, np.ndarray]]]


@dataclass
class Refinement:
    """What refinement learned: enough to apply it to other texts embedded by the same model."""

    centroids: np.ndarray  # (K, H) unit vectors
    log_priors: np.ndarray  # (K,)
    kappa: float = KAPPA
    keep_fraction: float = KEEP_FRACTION
    rounds: int = 0
    changed: list[float] = field(default_factory=list)  # fraction of predictions that moved, per round
    agreement_with_teacher: float = 0.0

    def log_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Unnormalised log posteriors (rows, K) of texts with these embeddings."""
        return (self.kappa * (embeddings.astype(np.float32, copy=False) @ self.centroids.T) + self.log_priors).astype(np.float32)

    def posteriors(self, embedding_chunks: "EmbeddingChunks", num_rows: int, temperature: float = 1.0) -> np.ndarray:
        """softmax(log scores / T) for every row, (N, K) float32, computed chunk by chunk."""
        out = np.empty((num_rows, len(self.centroids)), dtype=np.float32)
        for start, chunk in embedding_chunks():
            out[start : start + len(chunk)] = _softmax_rows(self.log_scores(chunk) / temperature)
        return out

    def settings(self) -> dict:
        return {
            "method": METHOD,
            "kappa": self.kappa,
            "keep_fraction": self.keep_fraction,
            "max_rounds": MAX_ROUNDS,
            "min_change": MIN_CHANGE,
            "rounds": self.rounds,
            "changed_per_round": [round(c, 6) for c in self.changed],
            "agreement_with_teacher": round(self.agreement_with_teacher, 6),
        }


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(1, keepdims=True)
    return scores


def _kept_rows(posteriors: np.ndarray, teacher_prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, predicted class): per predicted class, its most confident KEEP_FRACTION that the teacher agrees with."""
    prediction = posteriors.argmax(1).astype(np.int32)
    confidence = posteriors.max(1)
    kept = np.zeros(len(posteriors), dtype=bool)
    for k in range(posteriors.shape[1]):
        rows = np.flatnonzero(prediction == k)
        if len(rows) == 0:
            continue
        count = max(1, int(np.ceil(KEEP_FRACTION * len(rows))))
        # A stable sort on -confidence: ties keep row order, so the result never depends on anything but the data.
        top = rows[np.argsort(-confidence[rows], kind="stable")[:count]]
        kept[top] = True
    kept &= prediction == teacher_prediction
    return kept, prediction


def refine(teacher_posteriors: np.ndarray, embedding_chunks: EmbeddingChunks, log: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, Refinement]:
    """Refined posteriors (N, K) float32 and the fitted Refinement. Deterministic: no randomness anywhere."""
    posteriors = np.asarray(teacher_posteriors, dtype=np.float32)
    del teacher_posteriors  # memory: from the first round on, only the teacher's predictions are needed
    n, k = posteriors.shape
    teacher_prediction = posteriors.argmax(1).astype(np.int32)
    refinement = None
    for round_number in range(1, MAX_ROUNDS + 1):
        kept, prediction = _kept_rows(posteriors, teacher_prediction)
        sums, width = None, None
        for start, chunk in embedding_chunks():
            rows = slice(start, start + len(chunk))
            weights = np.zeros((len(chunk), k), dtype=np.float32)
            weights[np.flatnonzero(kept[rows]), prediction[rows][kept[rows]]] = 1.0
            contribution = weights.T @ chunk
            sums = contribution if sums is None else sums + contribution
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        # A class with no kept rows keeps a zero centroid: its score is then its prior alone.
        centroids = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
        log_priors = np.log(np.clip(posteriors.mean(0), 1e-12, None)).astype(np.float32)
        refinement = Refinement(centroids.astype(np.float32, copy=False), log_priors, rounds=round_number, changed=refinement.changed if refinement else [])
        posteriors = None  # freed before the next round's array is made: memory stays at one (N, K) array
        posteriors = refinement.posteriors(embedding_chunks, n)
        changed = float((posteriors.argmax(1) != prediction).mean())
        refinement.changed.append(changed)
        log(f"refinement round {round_number}: {kept.sum()} anchor rows, {changed:.2%} of predictions moved")
        if changed < MIN_CHANGE:
            break
    refinement.agreement_with_teacher = float((posteriors.argmax(1) == teacher_prediction).mean())
    return posteriors, refinement


def embedding_fingerprint(manifest: dict) -> str | None:
    """Which model made a cache's text embeddings: refinement fitted on one cache applies only to caches that match."""
    if not manifest.get("text_embedding_column"):
        return None
    if manifest.get("embedding_model"):
        return manifest["embedding_model"]["fingerprint"]
    return manifest["teacher"]["fingerprint"]


def embedding_chunks(cache_path: str, manifest: dict) -> EmbeddingChunks:
    """The cache's text embeddings, one shard at a time (see zsdistill.cache.iter_shards)."""
    from zsdistill import cache

    return lambda: cache.column_chunks(cache_path, manifest, manifest["text_embedding_column"])


def save(refinement: Refinement, path: str) -> None:
    np.savez(path, centroids=refinement.centroids, log_priors=refinement.log_priors, kappa=np.float32(refinement.kappa))


def load(path: str) -> Refinement:
    with np.load(path) as f:
        return Refinement(f["centroids"], f["log_priors"], kappa=float(f["kappa"]))
