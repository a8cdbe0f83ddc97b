"""PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 on one student: texts/s at batch 1 and 32, interleaved.

    python benchmarks/onnx_speed.py --model demo/student --test_file demo/data/test.jsonl

The student must be exported first (train_student.py --export onnx, or export_student.py). Each repeat times every
runtime once at each batch size, in turn, so a noisy neighbour slows all of them alike; the table gives the median
and the spread (min-max) of the repeats, and the median (min-max) of each repeat's ratio to PyTorch's. Accuracy and
agreement with the PyTorch student are measured once on the whole test file. Tokenization is timed for all three.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate  # noqa: E402
from zsdistill import data, models, serving
from zsdistill.metrics import encode_labels, label_metrics  # noqa: E402


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if flag in flags)


def main(
    model: str = "demo/student",
    test_file: str = "demo/data/test.jsonl",
    repeats: int = 5,
    texts: int = 512,
    batch_one_texts: int = 128,
    batch_size: int = 32,
) -> None:
    import torch

    device = models.select_device(no_cuda=True)
    student, tokenizer = evaluate.load_student(model, device)
    multi_label = student.config.problem_type == "multi_label_classification"
    class_names = [student.config.id2label[i] for i in range(student.config.num_labels)]
    max_length = models.resolve_max_length(tokenizer, student, None)
    all_texts, labels = data.read_labeled(test_file)
    true = encode_labels(labels, class_names, multi_label, test_file)
    runtimes = {"PyTorch fp32": serving.TorchClassifier(student, tokenizer)}
    for precision, name in serving.FILES.items():
        runtimes[f"ONNX Runtime {precision}"] = serving.OnnxClassifier(
            os.path.join(model, serving.ONNX_DIR, name), tokenizer
        )

    quality, reference = {}, None
    for runtime, classifier in runtimes.items():
        probabilities, _ = serving.predict(classifier, tokenizer, all_texts, 64, max_length, multi_label)
        reference = probabilities if reference is None else reference
        metrics = label_metrics(true, probabilities, class_names, multi_label)
        quality[runtime] = {
            "accuracy": metrics.get("accuracy", metrics.get("subset_accuracy")),
            "macro_f1": metrics["macro_f1"],
            **serving.parity(reference, probabilities, multi_label),
        }

    speeds = {runtime: {batch_size: [], 1: []} for runtime in runtimes}
    for _ in range(repeats):
        for size, count in ((batch_size, texts), (1, batch_one_texts)):
            for runtime, classifier in runtimes.items():
                speeds[runtime][size].append(
                    serving.predict(classifier, tokenizer, all_texts[:count], size, max_length, multi_label)[1]
                )

    print(
        f"Machine: {models.hardware_name(device)}, CPU flags {cpu_flags()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"onnxruntime {__import__('onnxruntime').__version__}; {time.strftime('%Y-%m-%d')}; student {model}"
    )
    print(
        f"Speed: {repeats} interleaved repeats, {texts} texts at batch {batch_size}, {batch_one_texts} at batch 1 "
        f"(texts/s, median and min-max). Quality: all {len(all_texts)} texts of {test_file}.\n"
    )
    print(
        f"| runtime | texts/s batch 1 | x PyTorch | texts/s batch {batch_size} | x PyTorch | accuracy | macro-F1 "
        f"| agreement with PyTorch | largest probability difference |"
    )
    print("| --- " * 9 + "|")
    for runtime in runtimes:
        cells = []
        for size in (1, batch_size):
            values = speeds[runtime][size]
            # The ratio within each repeat, then its median: a slow minute on a shared machine slows both sides alike.
            ratios = np.array(values) / np.array(speeds["PyTorch fp32"][size])
            cells += [
                f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})",
                f"{np.median(ratios):.2f} ({ratios.min():.2f}-{ratios.max():.2f})",
            ]
        q = quality[runtime]
        print(
            f"| {runtime} | "
            + " | ".join(cells)
            + f" | {q['accuracy']:.4f} | {q['macro_f1']:.4f} | {q['agreement']:.4f} "
            f"| {q['max_probability_difference']:.4f} |"
        )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
