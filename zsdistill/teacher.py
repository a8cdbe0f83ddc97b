"""Which teacher this is: find it (local directory or hub), fingerprint it, tell its kind and labels, load it.

Two kinds of teacher:
- `nli`: a sequence-classification model with an entailment label; one forward pass per (text, class)
  hypothesis pair. We keep every output logit.
- `embedding`: an encoder with no classification head; each text and each hypothesis is embedded once
  (mean pooling over the attention mask, L2-normalised) and we keep their cosine similarities.

Running it over batches is zsdistill.inference's job. Stage 1 uses both; stage 3 only to time the live teacher.
"""

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from zsdistill.errors import UserError

# A hub id is `name` or `org/name`; anything else that does not exist locally is a wrong path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
WEIGHT_FILES = (
    "config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
)


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

    ignore = [
        "*.h5",
        "*.msgpack",
        "*.onnx",
        "*.ot",
        "*.tflite",
        "onnx/*",
        "openvino/*",
        "coreml/*",
        "flax_*",
        "tf_*",
        "rust_*",
    ]
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
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name, your network, or pass "
            f"a local path"
        ) from None
    return path, "hub:" + name + "@" + os.path.basename(os.path.normpath(path))


def _find_label(labels: dict[int, str], *prefixes: str) -> int | None:
    for index, label in sorted(labels.items()):
        if label.lower().replace(" ", "_").replace("-", "_").startswith(prefixes):
            return index
    return None


def _column_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_") or "label"


def resolve_teacher(
    name_or_path: str, revision: str | None = None, kind: str | None = None, trust_remote_code: bool = False
) -> Teacher:
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
        raise UserError(
            f"teacher {name_or_path!r}: cannot read its config.json ({str(e).splitlines()[0]}){hint}"
        ) from None

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
        model = model_class.from_pretrained(
            teacher.local_path, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as e:
        raise UserError(f"teacher {teacher.name_or_path!r}: cannot load it ({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    return model, tokenizer


def load_tokenizer(teacher: Teacher, trust_remote_code: bool = False):
    """The teacher's tokenizer and config only (cheap): enough to count what its max_length cuts."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return (
            AutoTokenizer.from_pretrained(teacher.local_path, trust_remote_code=trust_remote_code),
            AutoConfig.from_pretrained(teacher.local_path, trust_remote_code=trust_remote_code),
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"teacher {teacher.name_or_path!r}: cannot load its tokenizer ({str(e).splitlines()[0]})"
        ) from None
