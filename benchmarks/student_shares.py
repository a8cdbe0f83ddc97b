"""How much of a label-free student's error is its class shares: the student's logits shifted by one bias a class.

    python benchmarks/quality.py --tasks ... --learning_rates 5e-5 --seeds 0     # first: the students
    python benchmarks/student_shares.py --tasks demo,nouns-11 --student default-lr5e-05-seed0

Per task, one student of benchmarks/quality.py (its folder under work_dir/students/TASK/) and its logits on the pool
and the test texts. A bias a class is added to its logits so that the share of texts it predicts in each class matches
a target share: on the pool (label-free) the refined targets' mean posterior (the refinement in the student folder,
applied to the pool's cached embeddings), their most-likely-class shares, or the teacher's mean posterior; then, as
an oracle that no user has, on the test set its true class shares. Accuracy / macro-F1 on the test set and the classes
lost against the teacher (issue 26's rule). The oracle row says how far fixing the class mix alone could move the
student; the label-free rows whether any share the pool offers is closer to it than the student's own.

With --random_labels n1,n2,...: also the shares of n test texts drawn at random (their labels counted, half a text
added to every class), imposed the same way, scored on the other test texts against the student on those texts:
how many labels a user would need to set the class mix this way (the median and range over --draws draws).
"""

import json
import os
import sys

import fire
import numpy as np
import torch
from sklearn.metrics import f1_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
import refine_rules  # noqa: E402
from zsdistill import refine, serving  # noqa: E402


def share_bias(logits: np.ndarray, shares: np.ndarray, steps: int = 300) -> np.ndarray:
    """Biases (K,) under which argmax(logits + bias) gives each class about `shares` of the rows (fixed-point steps)."""
    bias = np.zeros(logits.shape[1])
    for _ in range(steps):
        predicted = np.bincount((logits + bias).argmax(1), minlength=len(bias)) / len(logits)
        bias += 0.3 * (np.log(shares + 1e-4) - np.log(predicted + 1e-4))
        bias -= bias.mean()
    return bias


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    return f1_score(labels, predicted, labels=range(num_classes), average="macro", zero_division=0)


def random_label_shares(logits: np.ndarray, labels: np.ndarray, sizes: list[int], draws: int) -> list[str]:
    """Per size n: macro-F1 change (points) when the shares of n random labeled texts are imposed, on the rest."""
    num_classes, lines = logits.shape[1], []
    for n in sizes:
        changes = []
        for draw in range(draws):
            order = np.random.default_rng(draw).permutation(len(labels))
            labeled, rest = order[:n], order[n:]
            shares = (np.bincount(labels[labeled], minlength=num_classes) + 0.5) / (n + 0.5 * num_classes)
            shifted = (logits[rest] + share_bias(logits, shares)).argmax(1)
            changes.append(
                macro_f1(labels[rest], shifted, num_classes)
                - macro_f1(labels[rest], logits[rest].argmax(1), num_classes)
            )
        changes = 100 * np.array(changes)
        lines.append(f"{n} labels: {np.median(changes):+.1f} ({changes.min():+.1f} to {changes.max():+.1f})")
    return lines


def main(
    tasks: str | tuple = tuple(quality.TASKS),
    student: str = "default-lr5e-05-seed0",
    work_dir: str = "bench/quality",
    random_labels: str | int | tuple = (),
    draws: int = 20,
) -> None:
    """Print one table per task.

    Args:
        tasks: comma-separated task names (benchmarks/quality.py's).
        student: the student folder's name under work_dir/students/TASK/ (quality.py's tag-lrLR-seedSEED).
        work_dir: benchmarks/quality.py's work_dir.
        random_labels: comma-separated numbers of random labeled test texts whose shares to impose (none: skip).
        draws: random draws of each number.
    """
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in tasks.split(",") if isinstance(tasks, str) else tasks:
        task = refine_rules.load_task(name, work_dir)
        student_dir = os.path.join(work_dir, "students", name, student)
        with open(os.path.join(task["data_dir"], "train.txt")) as f:
            pool_texts = f.read().splitlines()
        with open(os.path.join(task["data_dir"], "test.jsonl")) as f:
            test_texts = [json.loads(line)["text"] for line in f]
        pool_logits, test_logits = (
            serving.student_logits(student_dir, pool_texts),
            serving.student_logits(student_dir, test_texts),
        )
        refinement = refine.load(os.path.join(student_dir, "refinement.npz"))
        refined = refine.softmax_rows(refinement.log_scores(task["pool"]["embeddings"]).astype(np.float64))
        num_classes, labels = len(task["class_names"]), task["labels"]
        true_shares = np.bincount(labels, minlength=num_classes) / len(labels)
        biases = {
            "the student": np.zeros(num_classes),
            "shares of the targets' mean posterior (pool)": share_bias(pool_logits, refined.mean(0)),
            "shares of the targets' labels (pool)": share_bias(
                pool_logits, np.bincount(refined.argmax(1), minlength=num_classes) / len(refined)
            ),
            "shares of the teacher's mean posterior (pool)": share_bias(pool_logits, task["pool"]["teacher"].mean(0)),
            "oracle: the test set's true shares": share_bias(test_logits, true_shares),
        }
        print(f"\n**{name}** (student `{student}`)\n")
        print("| predicted shares matched to | accuracy | macro-F1 | classes lost against the teacher |")
        print("| --- | --- | --- | --- |")
        for row, bias in biases.items():
            predicted = (test_logits + bias).argmax(1)
            lost = refine_rules.lost_classes(task, predicted)
            print(
                f"| {row} | {(predicted == labels).mean():.4f} | {macro_f1(labels, predicted, num_classes):.4f} | "
                f"{', '.join(lost) or 'none'} |"
            )
        student_shares = np.bincount(test_logits.argmax(1), minlength=num_classes) / len(labels)
        worst = int(np.argmax(np.abs(student_shares - true_shares)))
        print(
            f"\nThe class whose predicted share is furthest from its true one: `{task['class_names'][worst]}`, "
            f"{student_shares[worst]:.1%} of the test texts against {true_shares[worst]:.1%}.",
            flush=True,
        )
        sizes = quality.as_list(random_labels, int)
        if sizes:
            print(
                f"\nThe shares of n random labeled test texts imposed, macro-F1 change on the other test texts, "
                f"median (range) over {draws} draws: "
                + "; ".join(random_label_shares(test_logits, labels, sizes, draws)),
                flush=True,
            )


if __name__ == "__main__":
    fire.Fire(main)
