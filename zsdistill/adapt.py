"""Adaptation past the frozen space: fine-tune the embedding model refinement uses on its own surest texts.

Refinement moves the class anchors within the cached embedding space, but the space itself was made for general
sentence similarity, not for this task's classes. Gera et al. 2022 ("Zero-Shot Text Classification with
Self-Training") fine-tune the zero-shot model on its own most confident predictions; in embedding form, one round:

    refine in the current space (zsdistill.refine, the stage 2 method and settings)
    per refined class, its ADAPT_FRACTION most confident texts (at least one; with teacher_agrees, only texts whose
        teacher label is that class, as co-training takes what two views agree on), with the class names' words
        removed from them (Gera et al.'s token masking: the model must learn the texts' other words, not the names)
    fine-tune the encoder EPOCHS epoch(s) on them with the zero-shot loss
        cross-entropy(softmax_k(KAPPA * cos(text, hypothesis_k)), refined class)
    re-embed every text of the cache with the adapted encoder; the next round (or the targets) refine there

Rounds are cached beside the teacher cache, keyed like it: <cache>/adapted/<key>/ holds the round's text embeddings
(embeddings.npy, N x H float32) and its encoder, <key> a hash of the cache key, the embedding model and every
setting below up to that round. A second student run with the same settings reads the embeddings and trains
nothing; round 2 starts from round 1's encoder if that is cached. Deterministic for a seed on one machine.

Opt-in (train_student.py --adapt_rounds N, default 0): measured in benchmarks/README.md ("Adaptation"), it does not
help every task. Memory: the embeddings of the whole cache (N x H float32) while adapting; NLI caches adapt the
embedding model that refinement uses, never the NLI teacher.
"""

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from zsdistill import cache, refine
from zsdistill.targets import SIMILARITY_SCALE

KAPPA = 1.0 / SIMILARITY_SCALE  # the scale these sentence-embedding models are trained with (as refinement's)
DIRECTORY = "adapted"
EMBEDDINGS = "embeddings.npy"
ENCODER = "encoder"
INFO = "adaptation.json"


@dataclass
class AdaptSettings:
    """What an adaptation round depends on besides the cache (the cache key covers the texts and the teacher)."""

    rounds: int = 1
    fraction: float = 0.3  # of each refined class, its surest texts are trained on (Gera et al.'s share)
    mask_class_names: bool = True  # remove the class names' words from the texts trained on
    teacher_agrees: bool = False  # train only on texts whose teacher label is their refined class (two views agree)
    epochs: int = 1
    learning_rate: float = 2e-5
    batch_size: int = 32
    max_length: int = 128  # tokens of a text while training (re-embedding uses the model's own maximum)
    seed: int = 0
    refine_center: bool = True
    refine_free_last_round: bool = True
    refine_density_weights: bool = True
    refine_drift_guard: bool = True

    def key(self, cache_key: str, embedding_fingerprint: str, rounds: int) -> str:
        """The cache key of these settings' first `rounds` rounds."""
        settings = asdict(self)
        if not self.teacher_agrees:
            del settings["teacher_agrees"]  # keys of rounds cached before the setting existed stay the same
        if not self.refine_drift_guard:
            del settings["refine_drift_guard"]  # the rounds cached before the guard existed were made without it
        fields = {
            **settings,
            "rounds": rounds,
            "cache": cache_key,
            "embedding_model": embedding_fingerprint,
            "version": 1,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def class_name_pattern(class_names: list[str]) -> re.Pattern:
    """Matches any word of any class name, whole words, any case (e.g. 'operating system' -> operating, system)."""
    words = sorted(
        {w for name in class_names for w in re.findall(r"\w+", name.lower()) if len(w) > 1}, key=len, reverse=True
    )
    return (
        re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else re.compile(r"(?!x)x")
    )


def mask_class_names(texts: list[str], class_names: list[str]) -> list[str]:
    """The texts without the class names' words (runs of spaces left by a removal closed up)."""
    pattern = class_name_pattern(class_names)
    return [" ".join(pattern.sub(" ", text).split()) for text in texts]


def surest_rows(posteriors: np.ndarray, fraction: float, teacher_prediction: np.ndarray | None = None) -> np.ndarray:
    """Per predicted class, its `fraction` most confident rows (at least one), in row order. With the teacher's
    predicted labels, only rows the teacher also gives that class are candidates (as many as there are, up to the
    class's `fraction`)."""
    prediction, confidence = posteriors.argmax(1), posteriors.max(1)
    chosen = []
    for k in range(posteriors.shape[1]):
        rows = np.flatnonzero(prediction == k)
        count = max(1, int(np.ceil(fraction * len(rows))))
        if teacher_prediction is not None:
            rows = rows[teacher_prediction[rows] == k]
        if len(rows):
            chosen.append(rows[np.argsort(-confidence[rows], kind="stable")[:count]])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def fine_tune(
    model,
    tokenizer,
    texts: list[str],
    labels: np.ndarray,
    hypotheses: list[str],
    settings: AdaptSettings,
    pooling: str,
    log: Callable[[str], None],
) -> float:
    """settings.epochs over (text, class) pairs with the zero-shot loss; returns the last epoch's mean loss."""
    import torch

    from zsdistill.inference import pool

    torch.manual_seed(settings.seed)
    order_rng = np.random.default_rng(settings.seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    hypothesis_batch = tokenizer(
        hypotheses, padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt"
    ).to(device)
    model.train()
    mean_loss = float("nan")
    for epoch in range(settings.epochs):
        losses = []
        order = order_rng.permutation(len(texts))
        for start in range(0, len(texts), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                return_tensors="pt",
            ).to(device)
            texts_embedded = pool(model(**batch).last_hidden_state, batch["attention_mask"], pooling)
            similarity = (
                texts_embedded
                @ pool(model(**hypothesis_batch).last_hidden_state, hypothesis_batch["attention_mask"], pooling).T
            )
            loss = torch.nn.functional.cross_entropy(KAPPA * similarity, torch.as_tensor(labels[rows], device=device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        log(f"adaptation: epoch {epoch + 1}/{settings.epochs} on {len(texts)} texts, zero-shot loss {mean_loss:.4f}")
    model.eval()
    return mean_loss


def read_texts(cache_path: str, manifest: dict) -> list[str]:
    return [
        text
        for _, table in cache.iter_shards(cache_path, manifest, ["text"])
        for text in table.column("text").to_pylist()
    ]


def adapted_embeddings(
    cache_path: str,
    manifest: dict,
    settings: AdaptSettings,
    teacher_chunks: refine.Chunks,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[np.ndarray, dict]:
    """The cache's texts embedded by the encoder after settings.rounds rounds (N, H) float32, and the record stage 2
    keeps: the settings, per round the texts trained on, loss, seconds and whether it was read from the cache, and the
    last round's key and directory (its encoder embeds new texts into the same space)."""
    from zsdistill import inference, models
    from zsdistill import teacher as zs_teacher

    described = manifest.get("embedding_model") or manifest["teacher"]
    fingerprint = refine.embedding_fingerprint(manifest)
    root = os.path.join(cache_path, DIRECTORY)
    n, class_names = manifest["num_examples"], manifest["class_names"]

    def round_key(rounds: int) -> str:
        return settings.key(manifest["key"], fingerprint, rounds)

    def record(rounds: list[dict]) -> dict:
        key = round_key(settings.rounds)
        return {"settings": asdict(settings), "rounds": rounds, "key": key, "directory": os.path.join(root, key)}

    # The newest round already cached, if any: rounds before it are never redone.
    done = next((r for r in range(settings.rounds, 0, -1) if os.path.exists(os.path.join(root, round_key(r), INFO))), 0)
    records = []
    if done:
        with open(os.path.join(root, round_key(done), INFO)) as f:
            records = [{**r, "cached": True} for r in json.load(f)["rounds"]]
    if done == settings.rounds:
        log(f"adaptation: {done} round(s) read from {os.path.join(root, round_key(done))}")
        return np.load(os.path.join(root, round_key(done), EMBEDDINGS)), record(records)

    from transformers import AutoModel, AutoTokenizer

    if done:
        start_from = os.path.join(root, round_key(done), ENCODER)
    else:
        start_from = zs_teacher.resolve_teacher(described["name_or_path"], kind="embedding").local_path
    tokenizer = AutoTokenizer.from_pretrained(start_from)
    model = AutoModel.from_pretrained(start_from).to(models.select_device())  # a GPU where there is one
    pooling = described.get("pooling") or "mean"
    texts = read_texts(cache_path, manifest)
    teacher_prediction = (
        np.concatenate([chunk.argmax(1) for _, chunk in teacher_chunks()]) if settings.teacher_agrees else None
    )
    if done:
        embeddings = np.load(os.path.join(root, round_key(done), EMBEDDINGS))
    else:
        embeddings = np.concatenate([chunk for _, chunk in refine.embedding_chunks(cache_path, manifest)()]).astype(
            np.float32
        )
    max_length = models.resolve_max_length(tokenizer, model, None)
    for round_number in range(done + 1, settings.rounds + 1):
        started = time.time()
        posteriors, _ = refine.refine(
            teacher_chunks,
            lambda: iter([(0, embeddings)]),
            n,
            len(class_names),
            center=settings.refine_center,
            free_last_round=settings.refine_free_last_round,
            density_weights=settings.refine_density_weights,
            drift_guard=settings.refine_drift_guard,
            propagate=0.0,  # a round trains on the centroids' surest texts, as measured (benchmarks/README.md)
        )
        rows = surest_rows(posteriors, settings.fraction, teacher_prediction)
        chosen = [texts[i] for i in rows]
        if settings.mask_class_names:
            chosen = mask_class_names(chosen, class_names)
        loss = fine_tune(
            model, tokenizer, chosen, posteriors.argmax(1)[rows], manifest["hypotheses"], settings, pooling, log
        )
        embeddings = inference.embed(model, tokenizer, texts, max_length, 64, 16384, pooling)
        this_round = {
            "round": round_number,
            "texts_trained_on": int(len(rows)),
            "loss": round(loss, 6),
            "seconds": round(time.time() - started, 3),
            "cached": False,
        }
        records.append(this_round)
        _publish(
            root,
            round_key(round_number),
            embeddings,
            model,
            tokenizer,
            {"settings": asdict(settings), "rounds": records, "cache": manifest["key"], "embedding_model": fingerprint},
        )
        log(
            f"adaptation round {round_number}: fine-tuned on {len(rows)} texts ({settings.fraction:.0%} surest of "
            f"each refined "
            f"class{', class names masked' if settings.mask_class_names else ''}), re-embedded {n} texts in "
            f"{this_round['seconds']:.1f}s"
        )
    return embeddings, record(records)


def _publish(root: str, key: str, embeddings: np.ndarray, model, tokenizer, info: dict) -> None:
    """Write one round's embeddings, encoder and record into a staging directory, then move it into place: a
    crash leaves no half-written round (a staging directory is removed on the next failure or ignored)."""
    final = os.path.join(root, key)
    staging = os.path.join(root, f".staging-{key}-{os.getpid()}")
    os.makedirs(root, exist_ok=True)
    try:
        os.makedirs(staging)
        np.save(os.path.join(staging, EMBEDDINGS), embeddings)
        model.save_pretrained(os.path.join(staging, ENCODER))
        tokenizer.save_pretrained(os.path.join(staging, ENCODER))
        cache.write_json_atomic(os.path.join(staging, INFO), info)
        if os.path.exists(final):  # another run published the same round meanwhile: same settings, same content
            shutil.rmtree(staging)
            return
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
