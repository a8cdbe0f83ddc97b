"""Soft-target math, in one place: stage 2 trains on it, stage 3 rebuilds teacher predictions with it.

All functions take numpy arrays of shape (N, K) (one column per class) and return probabilities (N, K).
"""

import math
from typing import Iterator

import numpy as np

from zsdistill.errors import UserError

# Cosine similarities of sentence embeddings sit in a narrow band (about 0.0-0.6), so a plain softmax
# over them is nearly uniform. Dividing by SIMILARITY_SCALE (tau) first makes T=1 meaningful; 0.05 is the
# scale (20x) sentence-transformers trains these models with (MultipleNegativesRankingLoss).
SIMILARITY_SCALE = 0.05


def check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise UserError(f"--temperature {temperature!r} is not a number; give a positive number such as 1.0") from None
    if isinstance(temperature, bool) or math.isnan(value) or value <= 0 or math.isinf(value):
        raise UserError(f"--temperature {temperature!r} must be a finite number > 0, e.g. 1.0 or 2.0")
    return value


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def single_label_targets(entailment: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the K classes of entailment logits / T (the zero-shot pipeline's multi_label=False)."""
    return _softmax(np.asarray(entailment, dtype=np.float64) / temperature).astype(np.float32)


def multi_label_targets(entailment: np.ndarray, contradiction: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per class, softmax of (contradiction, entailment) / T, keep entailment (the pipeline's multi_label=True)."""
    difference = (np.asarray(entailment, dtype=np.float64) - np.asarray(contradiction, dtype=np.float64)) / temperature
    return (1.0 / (1.0 + np.exp(-difference))).astype(np.float32)


def similarity_targets(similarity: np.ndarray, temperature: float = 1.0, scale: float = SIMILARITY_SCALE) -> np.ndarray:
    """Softmax over the K classes of cosine similarity / (scale * T)."""
    return _softmax(np.asarray(similarity, dtype=np.float64) / (scale * temperature)).astype(np.float32)


def teacher_probabilities(columns: dict[str, np.ndarray], multi_label: bool, temperature: float = 1.0) -> np.ndarray:
    """Targets from a cache's logit columns: NLI caches hold `entailment`/`contradiction`, embedding caches
    `similarity`."""
    if "similarity" in columns:
        if multi_label:
            raise UserError(
                "multi-label targets need an NLI teacher: an embedding teacher's similarities have no per-class "
                "yes/no calibration; drop --multi_label or rebuild the cache with an NLI teacher"
            )
        return similarity_targets(columns["similarity"], temperature)
    if multi_label:
        return multi_label_targets(columns["entailment"], columns["contradiction"], temperature)
    return single_label_targets(columns["entailment"], temperature)


def cache_probability_chunks(
    cache_path: str, manifest: dict, multi_label: bool, temperature: float = 1.0
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, teacher_probabilities) for each shard of a cache, reading only the columns the targets need."""
    from zsdistill import cache

    width = len(manifest["class_names"])
    needed = (
        ["similarity"]
        if "similarity" in manifest["score_columns"]
        else ["entailment", "contradiction"]
        if multi_label
        else ["entailment"]
    )
    for start, table in cache.iter_shards(cache_path, manifest, needed):
        yield (
            start,
            teacher_probabilities(
                {name: cache.list_column_to_numpy(table.column(name), width) for name in needed},
                multi_label,
                temperature,
            ),
        )


def cache_probabilities(cache_path: str, manifest: dict, multi_label: bool, temperature: float = 1.0) -> np.ndarray:
    """teacher_probabilities over a whole cache, shard by shard: (N, K) float32 (memory: the result plus a shard)."""
    out = np.empty((manifest["num_examples"], len(manifest["class_names"])), dtype=np.float32)
    for start, probabilities in cache_probability_chunks(cache_path, manifest, multi_label, temperature):
        out[start : start + len(probabilities)] = probabilities
    return out


HOLDOUT_SEED = 1234  # the holdout split depends on the cache only, never on --seed


def holdout_split(num_examples: int, fraction: float, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, holdout) row indices."""
    permutation = np.random.default_rng(HOLDOUT_SEED).permutation(num_examples).astype(np.int32)  # int32: memory
    size = int(round(num_examples * fraction))
    if fraction > 0 and size == 0 and num_examples > 1:
        size = 1
    size = size if max_rows is None else min(size, max_rows)
    return np.sort(permutation[size:]), np.sort(permutation[:size])
