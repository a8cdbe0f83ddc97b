"""The zero-shot teacher, shared by stage 1 (teacher_infer.py) and stage 3's live timing (evaluate.py).

Two kinds of teacher:
- `nli`: a sequence-classification model with an entailment label; one forward pass per (text, class)
  hypothesis pair. We keep every output logit.
- `embedding`: an encoder with no classification head; each text and each hypothesis is embedded once
  (mean pooling over the attention mask, L2-normalised) and we keep their cosine similarities.

Speed (see benchmarks/teacher_throughput.py): each premise and each hypothesis is tokenized once and the
pair encodings are assembled from them; pairs are sorted by length and batched under a token budget so
almost no compute goes to padding; the original order is restored before anything is written.
"""

import glob
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from zsdistill.errors import UserError

# A hub id is `name` or `org/name`; anything else that does not exist locally is a wrong path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "*.model")


@dataclass
class Teacher:
    name_or_path: str
    local_path: str
    fingerprint: str  # hub commit, or a content hash of a local directory's weights and tokenizer
    kind: str  # "nli" or "embedding"
    id2label: dict[int, str] = field(default_factory=dict)
    label_columns: dict[str, int] = field(default_factory=dict)  # cache column -> logit index
    entailment_index: int | None = None
    contradiction_index: int | None = None
    pooling: str | None = None

    def describe(self) -> dict:
        return {
            "name_or_path": self.name_or_path,
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "label_columns": self.label_columns,
            "entailment_index": self.entailment_index,
            "contradiction_index": self.contradiction_index,
            "pooling": self.pooling,
            "normalized": True if self.kind == "embedding" else None,
        }


def _directory_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    files = sorted({f for pattern in WEIGHT_FILES for f in glob.glob(os.path.join(path, pattern))})
    for file in files:
        digest.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def _fetch_from_hub(name: str, revision: str | None) -> tuple[str, str]:
    """Download (or find in the local hub cache) a hub model; return its directory and commit."""
    import huggingface_hub

    ignore = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "onnx/*", "openvino/*", "coreml/*", "flax_*", "tf_*", "rust_*"]
    try:
        files = huggingface_hub.list_repo_files(name, revision=revision)
        if any(f.endswith(".safetensors") for f in files):
            ignore.append("*.bin")  # both formats are often published; one is enough
    except Exception:
        pass  # offline: snapshot_download below finds the local hub cache or says why it cannot
    try:
        path = huggingface_hub.snapshot_download(name, revision=revision, ignore_patterns=ignore)
    except Exception as e:
        raise UserError(
            f"teacher {name!r} is not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name, your network, or pass a local path"
        ) from None
    return path, "hub:" + name + "@" + os.path.basename(os.path.normpath(path))


def _find_label(labels: dict[int, str], *prefixes: str) -> int | None:
    for index, label in sorted(labels.items()):
        if label.lower().replace(" ", "_").replace("-", "_").startswith(prefixes):
            return index
    return None


def _column_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_") or "label"


def resolve_teacher(name_or_path: str, revision: str | None = None, kind: str | None = None, trust_remote_code: bool = False) -> Teacher:
    """Find the teacher, fingerprint it and work out its kind and labels, from its config alone (no weights)."""
    from transformers import AutoConfig

    if kind not in (None, "nli", "embedding"):
        raise UserError(f"--teacher_kind {kind!r} is not one of: nli, embedding")
    name_or_path = str(name_or_path)
    if os.path.isdir(name_or_path):
        local_path, fingerprint = name_or_path, _directory_fingerprint(name_or_path)
    elif os.path.exists(name_or_path):
        raise UserError(f"teacher {name_or_path!r} is a file; give a model directory or a hub id")
    elif not HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise UserError(
            f"teacher {name_or_path!r} does not exist locally and is not a hub model id (like 'roberta-large-mnli' "
            f"or 'org/name'); check the path"
        )
    else:
        local_path, fingerprint = _fetch_from_hub(name_or_path, revision)
    try:
        config = AutoConfig.from_pretrained(local_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        hint = " (pass --trust_remote_code if you trust its code)" if "trust_remote_code" in str(e) else ""
        raise UserError(f"teacher {name_or_path!r}: cannot read its config.json ({str(e).splitlines()[0]}){hint}") from None

    labels = {int(k): v for k, v in (config.id2label or {}).items()}
    entailment = _find_label(labels, "entail")
    has_head = any(a.endswith(("ForSequenceClassification", "ForNLI")) for a in (config.architectures or []))
    if kind is None:
        kind = "nli" if entailment is not None or has_head else "embedding"
    teacher = Teacher(name_or_path, local_path, fingerprint, kind, id2label=labels)
    if kind == "embedding":
        teacher.pooling = _pooling_mode(local_path)
        return teacher
    if entailment is None:
        raise UserError(
            f"teacher {name_or_path!r} has no entailment label (its labels: {', '.join(labels.values()) or 'none'}); "
            f"use an NLI model such as roberta-large-mnli, fix config.id2label, or pass --teacher_kind embedding"
        )
    contradiction = _find_label(labels, "contradict", "not_entail", "non_entail")
    if contradiction is None:
        if len(labels) != 2:
            raise UserError(
                f"teacher {name_or_path!r}: cannot tell which label is the contradiction side (its labels: "
                f"{', '.join(labels.values())}); name one 'contradiction' or 'not_entailment' in config.id2label"
            )
        contradiction = 1 - entailment
    columns = {"entailment": entailment, "contradiction": contradiction}
    for index, label in sorted(labels.items()):
        if index not in (entailment, contradiction):
            name = _column_name(label)
            if name in columns or name in ("text", "index"):
                name = f"label_{index}_{name}"
            columns[name] = index
    teacher.label_columns = columns
    teacher.entailment_index, teacher.contradiction_index = entailment, contradiction
    return teacher


def _pooling_mode(path: str) -> str:
    """Read sentence-transformers' pooling config when present; mean pooling otherwise."""
    try:
        with open(os.path.join(path, "1_Pooling", "config.json")) as f:
            pooling = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def select_device(no_cuda: bool = False) -> torch.device:
    if not no_cuda and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and thread count: what speed numbers were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else platform.processor()
    except OSError:
        cpu = platform.processor() or platform.machine()
    return f"{cpu} ({torch.get_num_threads()} threads)"


# (pairs, padded tokens) per forward pass. A CPU's matmuls are saturated by ~500-token batches; a GPU needs
# far more work per launch (on an H200, 256/65536 ran bf16 2.8x faster than 32/8192: README, Speed).
BATCH_DEFAULTS = {"cpu": (32, 8192), "cuda": (256, 65536)}


def default_batches(device: torch.device) -> tuple[int, int]:
    return BATCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


def check_precision(fp16: bool, bf16: bool, device: torch.device) -> str:
    if fp16 and bf16:
        raise UserError("--fp16 and --bf16 are exclusive; pick one")
    if fp16 and device.type != "cuda":
        raise UserError("--fp16 needs a GPU; on a CPU use --bf16 (where the CPU supports it) or neither")
    if bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise UserError("--bf16 is not supported by this CPU; drop it")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def load_model(teacher: Teacher, device: torch.device, trust_remote_code: bool = False):
    """Load the teacher's weights and tokenizer (the expensive step, done only when a forward pass is due)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModelForSequenceClassification if teacher.kind == "nli" else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher.local_path, trust_remote_code=trust_remote_code)
        model = model_class.from_pretrained(teacher.local_path, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise UserError(f"teacher {teacher.name_or_path!r}: cannot load it ({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    return model, tokenizer


def resolve_max_length(tokenizer, model, max_length: int | None) -> int:
    """The user's --max_length, else the tokenizer's model_max_length, capped by the position embeddings
    (for teachers and students alike)."""
    limit = tokenizer.model_max_length if tokenizer.model_max_length and tokenizer.model_max_length < 1e6 else 512
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models offset positions by padding_idx + 1.
        offset = getattr(model.config, "pad_token_id", 0) + 1 if model.config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limit = min(limit, positions - offset)
    return min(int(max_length), limit) if max_length else limit


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

    def encode(self, premise: list[int], hypothesis: list[int]) -> tuple[list[int], list[int]]:
        premise = premise[: self.premise_budget(len(hypothesis))]
        ids = self.prefix + premise + self.middle + hypothesis + self.suffix
        types = (
            self.prefix_types + [self.first_type] * len(premise) + self.middle_types + [self.second_type] * len(hypothesis) + self.suffix_types
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
    pair_lengths = (np.minimum(premise_lengths[:, None], budgets[None, :]) + hypothesis_lengths[None, :] + encoder.num_special).reshape(-1)
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
    device = next(model.parameters()).device
    ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
    lengths = np.array([len(i) for i in ids])
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    pad_id = tokenizer.pad_token_id or 0
    pending = []  # embeddings stay on the device until the end, as in nli_logits
    with torch.inference_mode(), _autocast(device, precision):
        for batch in length_sorted_batches(lengths, max_items, max_tokens):
            input_ids = _to_device(_pad([ids[i] for i in batch.tolist()], pad_id), device)
            attention_mask = _pad([[1] * len(ids[i]) for i in batch.tolist()], 0)
            device_mask = _to_device(attention_mask, device)
            hidden = model(input_ids=input_ids, attention_mask=device_mask).last_hidden_state.float()
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = device_mask.unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pending.append((batch, torch.nn.functional.normalize(pooled, p=2, dim=1)))
            if stats is not None:
                stats.record(attention_mask)
            if on_batch is not None:
                on_batch(len(batch))
    for batch, embeddings in pending:
        out[batch] = embeddings.cpu().numpy()
    return out
