"""Adaptation (train_student.py --adapt_rounds, zsdistill/adapt.py) on benchmarks/quality.py's tasks: refined targets.

    python benchmarks/quality.py --tasks ... --seeds 0     # first: builds the tasks and their teacher caches
    python benchmarks/adaptation.py --tasks nouns-25,verbs-15

Per task: refinement (the stage 2 default) fitted on the unlabeled pool in the cached (frozen) embedding space and in
the space of the encoder after `rounds` adaptation rounds (adapt.adapted_embeddings with its default settings, as
--adapt_rounds runs them: cached under the pool cache, so a second run trains nothing), each applied to the test set
embedded by the same encoder. Accuracy / macro-F1 / ECE on the test labels and the classes lost against the raw
teacher (issue 26's rule), with each round's texts trained on and seconds. Minutes a round on 2 CPU cores.
"""

import os
import sys
import time

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
import refine_rules  # noqa: E402
import train_student  # noqa: E402
from zsdistill import adapt, models  # noqa: E402


def embedded_test_texts(task: dict, adapted: dict) -> np.ndarray:
    """The task's test texts embedded by the pool's adapted encoder (the last round's, `adapted` the pool's record),
    the way stage 2 embeds dev texts with it."""
    texts = adapt.read_texts(task["test"]["path"], task["test"]["manifest"])
    return train_student.embed_dev_texts(
        task["pool"]["manifest"], texts, os.path.join(adapted["directory"], adapt.ENCODER)
    )


def main(
    tasks: str | tuple = tuple(quality.TASKS),
    rounds: int = 1,
    work_dir: str = "bench/quality",
    teacher_agrees: bool = False,
) -> None:
    """Print one markdown row per task: the frozen space against `rounds` adaptation rounds (with --teacher_agrees,
    rounds that train only on texts whose teacher label is their refined class)."""
    import torch

    settings = adapt.AdaptSettings(rounds=rounds, teacher_agrees=teacher_agrees)
    machine = models.hardware_name(torch.device("cpu"))
    print(f"Machine: {machine}; {time.strftime('%Y-%m-%d')}; {settings}\n")
    print("| task | frozen space | adapted | texts trained on (per round) | round seconds (cached: read) |")
    print("| --- | --- | --- | --- | --- |")
    for name in quality.as_list(tasks, str):
        task = refine_rules.load_task(name, work_dir)
        pool = task["pool"]
        frozen = refine_rules.cell(task, refine_rules.on_test_set(task, refine_rules.fitted(task)))
        embeddings, record = adapt.adapted_embeddings(
            pool["path"], pool["manifest"], settings, lambda: iter([(0, pool["teacher"])])
        )
        adapted_task = {
            **task,
            "pool": {**pool, "embeddings": embeddings},
            "test": {**task["test"], "embeddings": embedded_test_texts(task, record)},
        }
        adapted = refine_rules.cell(
            adapted_task, refine_rules.on_test_set(adapted_task, refine_rules.fitted(adapted_task))
        )
        trained = ", ".join(str(r["texts_trained_on"]) for r in record["rounds"])
        seconds = ", ".join("read" if r["cached"] else f"{r['seconds']:.0f}" for r in record["rounds"])
        print(f"| {name} | {frozen} | {adapted} | {trained} | {seconds} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
