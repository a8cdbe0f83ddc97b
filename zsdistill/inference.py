"""The batched inference engine of stage 1 (and stage 3's live timing): NLI pair logits and sentence embeddings.

Speed (see benchmarks/teacher_throughput.py): each premise and each hypothesis is tokenized once and the
pair encodings are assembled from them; pairs are sorted by length and batched under a token budget so
almost no compute goes to padding; the original order is restored before anything is written.
"""

from dataclasses import dataclass

import numpy as np
import torch

from zsdistill.errors import UserError

# (pairs, padded tokens) per forward pass. A CPU's matmuls are saturated by ~500-token batches; a GPU needs
# far more work per launch (on an H200, 256/65536 ran bf16 2.8x faster than 32/8192: README, Speed).
BATCH_DEFAULTS = {"cpu": (32, 8192), "cuda": (256, 65536)}


def default_batches(device: torch.device) -> tuple[int, int]:
    return BATCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


class PairEncoder:
    """Builds `premise + hypothesis` encodings from separately tokenized parts, as the tokenizer would.

    The tokenizer's own pair template (special tokens and token types around each segment) is read once
    from a probe encoding, so BERT-, RoBERTa- and DeBERTa-style templates all come out right. Only the
    premise is truncated, as the zero-shot pipeline's `truncation="only_first"` does.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.use_token_types = "token_type_ids" in tokenizer.model_input_names
        probe = tokenizer("a", "b", return_token_type_ids=True)
        ids, types, segments = probe["input_ids"], probe["token_type_ids"], probe.sequence_ids()
        first = [i for i, s in enumerate(segments) if s == 0]
        second = [i for i, s in enumerate(segments) if s == 1]
        self.prefix = ids[: first[0]]
        self.middle = ids[first[-1] + 1 : second[0]]
        self.suffix = ids[second[-1] + 1 :]
        self.prefix_types = types[: first[0]]
        self.middle_types = types[first[-1] + 1 : second[0]]
        self.suffix_types = types[second[-1] + 1 :]
        self.first_type, self.second_type = types[first[0]], types[second[0]]
        self.num_special = len(self.prefix) + len(self.middle) + len(self.suffix)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        # A premise never needs more than max_length tokens; cutting here keeps 100k-character lines cheap.
        return self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.max_length, return_attention_mask=False
        )["input_ids"]

    def premise_budget(self, hypothesis_length: int) -> int:
        budget = self.max_length - hypothesis_length - self.num_special
        if budget < 1:
            raise UserError(
                f"a hypothesis is {hypothesis_length} tokens, too long for --max_length {self.max_length}; "
                f"shorten the class name or template, or raise --max_length"
            )
        return budget

    def shortest_budget(self, hypotheses: list[str]) -> int:
        """Premise tokens that fit beside every hypothesis: the longest hypothesis leaves the fewest."""
        return min(self.premise_budget(len(ids)) for ids in self.tokenize(hypotheses))

    def encode(self, premise: list[int], hypothesis: list[int]) -> tuple[list[int], list[int]]:
        premise = premise[: self.premise_budget(len(hypothesis))]
        ids = self.prefix + premise + self.middle + hypothesis + self.suffix
        types = (
            self.prefix_types
            + [self.first_type] * len(premise)
            + self.middle_types
            + [self.second_type] * len(hypothesis)
            + self.suffix_types
        )
        return ids, types


def length_sorted_batches(
    lengths: np.ndarray, max_pairs: int, max_tokens: int, max_padding: float = 0.03, min_tokens: int = 256
) -> list[np.ndarray]:
    """Group item indices into batches of similar length.

    Each batch holds at most `max_pairs` items and `max_tokens` padded tokens. Once a batch is big enough to
    keep the matrix units busy (`min_tokens`), it is also closed before padding would exceed `max_padding`
    of its tokens: in sparse stretches of the length distribution, two smaller batches beat one padded one.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = np.asarray(lengths)[order]
    batches, start = [], 0
    while start < len(order):
        stop, real_tokens = start + 1, int(sorted_lengths[start])
        while stop < len(order) and stop - start < max_pairs:
            # Lengths ascend, so the batch's padded size is (items) x (length of its last item).
            length, items = int(sorted_lengths[stop]), stop - start + 1
            if items * length > max_tokens:
                break
            big_enough = (items - 1) * int(sorted_lengths[stop - 1]) >= min_tokens
            if big_enough and 1 - (real_tokens + length) / (items * length) > max_padding:
                break
            real_tokens += length
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


def _pad(sequences: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # From pinned memory the copy is queued like a kernel; a blocking copy would wait for the GPU's queue.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class Stats:
    """What the teacher spent: forward passes (sequences), real and padded tokens."""

    forward_passes: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def record(self, attention_mask: torch.Tensor) -> None:
        self.forward_passes += attention_mask.shape[0]
        self.tokens += int(attention_mask.sum())
        self.padded_tokens += attention_mask.numel()


def nli_logits(
    model,
    encoder: PairEncoder,
    premise_ids: list[list[int]],
    hypothesis_ids: list[list[int]],
    max_pairs: int,
    max_tokens: int,
    precision: str = "fp32",
    stats: Stats | None = None,
    on_batch=None,
) -> np.ndarray:
    """Raw logits of every (premise, hypothesis) pair: array (n_premises, n_hypotheses, n_labels), float32."""
    device = next(model.parameters()).device
    n, k = len(premise_ids), len(hypothesis_ids)
    hypothesis_lengths = np.array([len(h) for h in hypothesis_ids])
    budgets = np.array([encoder.premise_budget(length) for length in hypothesis_lengths])
    premise_lengths = np.array([len(p) for p in premise_ids])
    pair_lengths = (
        np.minimum(premise_lengths[:, None], budgets[None, :]) + hypothesis_lengths[None, :] + encoder.num_special
    ).reshape(-1)
    out = np.empty((n * k, model.config.num_labels), dtype=np.float32)
    # Logits stay on the device until the end: copying each batch back would make the CPU wait for the GPU,
    # where now it builds and queues the next batch while the GPU computes this one.
    pending = []
    with torch.inference_mode(), _autocast(device, precision):
        for batch in length_sorted_batches(pair_lengths, max_pairs, max_tokens):
            encoded = [encoder.encode(premise_ids[p // k], hypothesis_ids[p % k]) for p in batch.tolist()]
            attention_mask = _pad([[1] * len(ids) for ids, _ in encoded], 0)
            inputs = {"input_ids": _pad([ids for ids, _ in encoded], encoder.pad_id), "attention_mask": attention_mask}
            if encoder.use_token_types:
                inputs["token_type_ids"] = _pad([types for _, types in encoded], 0)
            inputs = {name: _to_device(tensor, device) for name, tensor in inputs.items()}
            pending.append((batch, model(**inputs).logits.float()))
            if stats is not None:
                stats.record(attention_mask)
            if on_batch is not None:
                on_batch(len(batch))
    for batch, logits in pending:
        out[batch] = logits.cpu().numpy()
    return out.reshape(n, k, -1)


def embed(
    model,
    tokenizer,
    texts: list[str],
    max_length: int,
    max_items: int,
    max_tokens: int,
    pooling: str = "mean",
    precision: str = "fp32",
    stats: Stats | None = None,
    on_batch=None,
) -> np.ndarray:
    """L2-normalised sentence embeddings (n, hidden), float32, pooled as sentence-transformers does."""
    ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
    return embed_ids(
        model, ids, tokenizer.pad_token_id or 0, max_items, max_tokens, pooling, precision, stats, on_batch
    )


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """L2-normalised sentence embeddings from the last hidden states: the first token's ("cls"), or the mean over
    the attention mask, as sentence-transformers pools."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def embed_ids(
    model,
    ids: list[list[int]],
    pad_id: int,
    max_items: int,
    max_tokens: int,
    pooling: str = "mean",
    precision: str = "fp32",
    stats: Stats | None = None,
    on_batch=None,
) -> np.ndarray:
    """embed() of texts already tokenized (special tokens included)."""
    device = next(model.parameters()).device
    lengths = np.array([len(i) for i in ids])
    out = np.empty((len(ids), model.config.hidden_size), dtype=np.float32)
    pending = []  # embeddings stay on the device until the end, as in nli_logits
    with torch.inference_mode(), _autocast(device, precision):
        for batch in length_sorted_batches(lengths, max_items, max_tokens):
            input_ids = _to_device(_pad([ids[i] for i in batch.tolist()], pad_id), device)
            attention_mask = _pad([[1] * len(ids[i]) for i in batch.tolist()], 0)
            device_mask = _to_device(attention_mask, device)
            hidden = model(input_ids=input_ids, attention_mask=device_mask).last_hidden_state.float()
            pending.append((batch, pool(hidden, device_mask, pooling)))
            if stats is not None:
                stats.record(attention_mask)
            if on_batch is not None:
                on_batch(len(batch))
    for batch, embeddings in pending:
        out[batch] = embeddings.cpu().numpy()
    return out


# ---------------------------------------------------------------- long texts as overlapping windows
# (--chunk_long_texts)

WINDOW_OVERLAP = (
    0.25  # each window repeats the last quarter of the one before: a sentence cut by one is whole in the next
)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (e.g. [CLS] ... [SEP]), read from a probe encoding."""
    probe = tokenizer("a")
    content = [i for i, segment in enumerate(probe.sequence_ids()) if segment == 0]
    return probe["input_ids"][: content[0]], probe["input_ids"][content[-1] + 1 :]


def windows(ids: list[int], size: int) -> list[list[int]]:
    """`ids` as windows of at most `size` tokens, each starting (1 - WINDOW_OVERLAP) * size after the one before,
    the last ending at the end; a text that fits is its own single window."""
    if len(ids) <= size:
        return [ids]
    stride = max(1, size - int(size * WINDOW_OVERLAP))
    starts = list(range(0, len(ids) - size, stride)) + [len(ids) - size]
    return [ids[start : start + size] for start in starts]


def windows_of(texts_ids: list[list[int]], size: int) -> tuple[list[list[int]], np.ndarray]:
    """Every text's windows in one list, and the text each window belongs to."""
    flat, owners = [], []
    for text, ids in enumerate(texts_ids):
        parts = windows(ids, size)
        flat += parts
        owners += [text] * len(parts)
    return flat, np.array(owners, dtype=np.int64)


def aggregate_nli(
    logits: np.ndarray, owners: np.ndarray, num_texts: int, entailment: int, contradiction: int
) -> np.ndarray:
    """(windows, K, labels) -> (texts, K, labels): per text and class, every label's logits from the window that
    entails the class most (the largest entailment - contradiction margin). One rule serves single-label targets
    (a class is as supported as its best passage) and multi-label ones (each class judged on its best passage)."""
    margin = logits[:, :, entailment] - logits[:, :, contradiction]
    out = np.empty((num_texts,) + logits.shape[1:], dtype=np.float32)
    counts = np.bincount(owners, minlength=num_texts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # windows are grouped by text, in order
    single = counts == 1
    out[single] = logits[first[single]]
    classes = np.arange(logits.shape[1])
    for text in np.flatnonzero(~single).tolist():
        rows = slice(first[text], first[text] + counts[text])
        best = first[text] + margin[rows].argmax(0)
        out[text] = logits[best, classes]
    return out


def aggregate_embeddings(embeddings: np.ndarray, owners: np.ndarray, num_texts: int) -> np.ndarray:
    """(windows, H) -> (texts, H): the mean of a text's L2-normalised window embeddings, L2-normalised again."""
    out = np.zeros((num_texts, embeddings.shape[1]), dtype=np.float32)
    np.add.at(out, owners, embeddings)
    return out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
