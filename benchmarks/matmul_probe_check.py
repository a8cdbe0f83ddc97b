"""Is a matmul probe run right after a model batch a fair measure of this machine's matmul rate?

teacher_throughput.py measures (c)'s efficiency against one 2048x768 @ 768x3072 fp32 matmul run after every
batch. If the batch left that probe at a disadvantage (cold caches, idle threads), the probe would run slow and
flatter (c). This alternates a BERT-base forward pass, one probe, and four back-to-back matmuls, and compares
their rates; it also prints the spread of single matmuls, which is why a best-of-N "peak" overstates what the
machine sustains.

    python benchmarks/matmul_probe_check.py        # about 1 minute on 2 CPU cores
"""

import os
import statistics
import sys
import tempfile
import time

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import teacher_throughput  # noqa: E402


def main(rounds: int = 30, threads: int | None = None) -> None:
    from transformers import AutoModelForSequenceClassification

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as directory:
        teacher_dir, _ = teacher_throughput.build_models(directory, 8)
        model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
    input_ids = torch.randint(1000, 2000, (32, 24))  # a typical CPU batch: 32 pairs of 24 tokens
    a, b, flops = teacher_throughput.peak_matmul()

    def rate() -> float:
        started = time.perf_counter()
        torch.mm(a, b)
        return flops / (time.perf_counter() - started) / 1e9

    after_batch, back_to_back = [], []
    with torch.inference_mode():
        rate()
        for _ in range(rounds):
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            after_batch.append(rate())
            rate()  # the first of the run of matmuls is itself right after a probe; leave it out
            back_to_back += [rate() for _ in range(4)]
    print(
        f"machine: {teacher_throughput.models.hardware_name(torch.device('cpu'))}, torch {torch.__version__}, "
        f"{rounds} rounds"
    )
    print(
        f"probe right after a model batch: mean {statistics.mean(after_batch):.0f} GFLOP/s, median "
        f"{statistics.median(after_batch):.0f}"
    )
    print(
        f"back-to-back matmuls:            mean {statistics.mean(back_to_back):.0f} GFLOP/s, median "
        f"{statistics.median(back_to_back):.0f}"
    )
    every = after_batch + back_to_back
    print(f"single matmuls ranged {min(every):.0f}-{max(every):.0f} GFLOP/s")


if __name__ == "__main__":
    fire.Fire(main)
