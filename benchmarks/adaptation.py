"""Adaptation (train_student.py --adapt_rounds, zsdistill/adapt.py) on benchmarks/quality.py's tasks: refined targets.

    python benchmarks/quality.py --tasks ... --seeds 0     # first: builds the tasks and their teacher caches
    python benchmarks/adaptation.py --tasks nouns-25,verbs-15
    python benchmarks/adaptation.py --teacher_agrees True --dev_per_class 8   # with dev labels, as --dev_file does

Per task: refinement (the stage 2 default) fitted on the unlabeled pool in the cached (frozen) embedding space and in
the space of the encoder after `rounds` adaptation rounds (adapt.adapted_embeddings with its default settings, as
--adapt_rounds runs them: cached under the pool cache, so a second run trains nothing), each applied to the test set
embedded by the same encoder. Accuracy / macro-F1 / ECE on the test labels and the classes lost against the raw
teacher (issue 26's rule), with each round's texts trained on and seconds. Minutes a round on 2 CPU cores.

Beside them, label-free figures on the pool that a rule choosing whether to adapt could read (none of them needs a
label): the share of pool texts whose refined class the round keeps, the same among the texts it did not train on,
the share of pool texts whose teacher label is their refined class (frozen -> adapted), and the class whose share of
the pool's refined labels the round keeps least (its adapted share / frozen share).

With --dev_per_class k: instead, per task and dev draw (seeds 0 and 1, benchmarks/quality.py's draws of k labeled texts
a class), refinement with the dev texts as anchors (refine(labeled=...), as train_student.py --dev_file does) in the
frozen space and in the adapted one (the round is label-free; the dev texts are embedded by the adapted encoder, as
stage 2 embeds them with --adapt_rounds), both propagated as the student's targets are (the test texts join the
graph), the macro-F1 change in points, and the held-out dev labels' -log p per label in each space: the one with the
lower is the space --adapt_dev_check keeps. The round there is seed 0's for both draws (stage 2 trains it with the
student's seed).
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
from zsdistill import adapt, models, refine  # noqa: E402
from zsdistill.metrics import label_metrics  # noqa: E402


def embedded_test_texts(task: dict, adapted: dict) -> np.ndarray:
    """The task's test texts embedded by the pool's adapted encoder (the last round's, `adapted` the pool's record),
    the way stage 2 embeds dev texts with it."""
    texts = adapt.read_texts(task["test"]["path"], task["test"]["manifest"])
    return train_student.embed_dev_texts(
        task["pool"]["manifest"], texts, os.path.join(adapted["directory"], adapt.ENCODER)
    )


def label_free_signals(task: dict, frozen_scores: np.ndarray, adapted_scores: np.ndarray, settings) -> str:
    """What the pool alone says of the round (no label read): see the module docstring. With several rounds the
    texts not trained on are the first round's."""
    frozen, adapted = frozen_scores.argmax(1), adapted_scores.argmax(1)
    teacher = task["pool"]["teacher"].argmax(1)
    trained = adapt.surest_rows(
        refine.softmax_rows(frozen_scores.astype(np.float64)),
        settings.fraction,
        teacher if settings.teacher_agrees else None,
    )
    untrained = np.setdiff1d(np.arange(len(frozen)), trained)
    k = len(task["class_names"])
    frozen_share, adapted_share = np.bincount(frozen, minlength=k), np.bincount(adapted, minlength=k)
    ratio = np.where(frozen_share > 0, adapted_share / np.maximum(frozen_share, 1), np.inf)
    least = int(np.argmin(ratio))
    return (
        f"{(frozen == adapted).mean():.3f}, {(frozen[untrained] == adapted[untrained]).mean():.3f}, "
        f"{(teacher == frozen).mean():.3f} -> {(teacher == adapted).mean():.3f}, "
        f"`{task['class_names'][least]}` {ratio[least]:.2f}"
    )


def main(
    tasks: str | tuple = tuple(quality.TASKS),
    rounds: int = 1,
    work_dir: str = "bench/quality",
    teacher_agrees: bool = False,
    dev_per_class: int = 0,
) -> None:
    """Print one markdown row per task: the frozen space against `rounds` adaptation rounds (with --teacher_agrees,
    rounds that train only on texts whose teacher label is their refined class); with dev_per_class, one row per task
    and dev draw, both refined with the dev labels."""
    import torch

    settings = adapt.AdaptSettings(rounds=rounds, teacher_agrees=teacher_agrees)
    machine = models.hardware_name(torch.device("cpu"))
    print(f"Machine: {machine}; {time.strftime('%Y-%m-%d')}; {settings}\n")
    if dev_per_class:
        print(
            "| task | dev draw | frozen space + dev labels | adapted + dev labels | macro-F1 change (points) | "
            "held-out dev -log p, frozen / adapted | --adapt_dev_check keeps |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
    else:
        print(
            "| task | frozen space | adapted | texts trained on (per round) | round seconds (cached: read) | pool "
            "labels kept, of texts not trained on, teacher agrees (frozen -> adapted), class share kept least |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
    for name in quality.as_list(tasks, str):
        task = refine_rules.load_task(name, work_dir)
        pool = task["pool"]
        frozen_refinement = refine_rules.fitted(task)
        frozen = refine_rules.cell(task, refine_rules.on_test_set(task, frozen_refinement))
        embeddings, record = adapt.adapted_embeddings(
            pool["path"], pool["manifest"], settings, lambda: iter([(0, pool["teacher"])])
        )
        adapted_task = {
            **task,
            "pool": {**pool, "embeddings": embeddings},
            "test": {**task["test"], "embeddings": embedded_test_texts(task, record)},
        }
        if dev_per_class:
            encoder = os.path.join(record["directory"], adapt.ENCODER)
            for draw in (0, 1):
                cells = []
                for t, adapted_by in ((task, None), (adapted_task, encoder)):
                    labeled = refine_rules.dev_draw(task, dev_per_class, draw, encoder=adapted_by)
                    refinement = refine_rules.fitted(t, labeled=labeled)
                    # Propagated, as the student's targets are (the test texts join the graph).
                    probabilities = refine_rules.propagated(t, refinement)
                    macro_f1 = label_metrics(t["labels"], probabilities, t["class_names"], False)["macro_f1"]
                    cells.append((refine_rules.cell(t, probabilities), macro_f1, refinement.dev_held_out_nll))
                change = 100 * (cells[1][1] - cells[0][1])
                keeps = "adapted" if cells[1][2] < cells[0][2] else "frozen"
                print(
                    f"| {name} | {draw} | {cells[0][0]} | {cells[1][0]} | {change:+.1f} | {cells[0][2]:.3f} / "
                    f"{cells[1][2]:.3f} | {keeps} |",
                    flush=True,
                )
            continue
        adapted_refinement = refine_rules.fitted(adapted_task)
        adapted = refine_rules.cell(adapted_task, refine_rules.on_test_set(adapted_task, adapted_refinement))
        trained = ", ".join(str(r["texts_trained_on"]) for r in record["rounds"])
        seconds = ", ".join("read" if r["cached"] else f"{r['seconds']:.0f}" for r in record["rounds"])
        signals = label_free_signals(
            task, frozen_refinement.log_scores(pool["embeddings"]), adapted_refinement.log_scores(embeddings), settings
        )
        print(f"| {name} | {frozen} | {adapted} | {trained} | {seconds} | {signals} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
