"""Multi-label students calibrated on dev labels: one temperature for all classes, or one per class (issue 27).

    python benchmarks/multi_label_calibration.py                   # 2 seeds x lr 5e-5, 8 dev positives a class
    python benchmarks/multi_label_calibration.py --seeds 0 --per_class 4,8,16

The task, `debtags-15`: Debian package short descriptions (a Debian machine's apt lists) labeled with the package's
debtags among 15 facet tags that name a subject (works-with::audio -> `audio`, use::gameplaying -> `games`,
field::biology -> `biology`, ...): a text carries every one of them its package has (13% carry two or more).
Debtags are assigned by people and tools outside the description, so the labels are independent of the texts.

No NLI weights exist offline, so the teacher is a toy NLI teacher built from a real one's ingredients: the MiniLM
embedding cache's cosine of each text to each class's hypothesis, as an entailment logit (cos - t) / s against a
contradiction logit of 0, t one threshold for all classes (the pool's top-decile cosine, read from the scores alone),
s the scale (--teacher_scale; 0.05, the embedding teacher's own; 0.02 makes a sharper, over-confident teacher, as NLI
teachers' yes/no scores often are).
Like an NLI teacher's, its yes/no calibration differs from class to class, as the class names sit differently in the
model's space. Stage 2 runs as a user runs it (train_student.py --multi_label --dev_file, calibration off so the raw
logits can be compared); then, on the student's logits:
    none         the student's own probabilities
    targets      one temperature fitted on the held-out rows' targets (stage 2's label-free calibration)
    targets, per class  one temperature a class, each fitted on the held-out rows' targets of that class
    dev, shared  one temperature fitted on the dev labels (stage 2's calibration with --dev_file)
    dev, per class  one temperature a class, each fitted on the dev labels of that class (stage 2's rule now,
                 train_student.per_class_temperatures: the shared one for a class the dev set shows present or absent
                 under 3 times)
The dev texts are drawn from labeled texts in neither the pool nor the test set: per class `k` texts that carry it
(a text drawn for one class counts for all it carries), or with --dev_at_random as many texts drawn at random (the
data's class shares). ECE over every (text, class) probability and macro-F1 at 0.5 on the test set; the mean over
classes of each class's own ECE shows where a shared temperature leaves a class off.
"""

import hashlib
import json
import os
import random
import sys
import time

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from zsdistill import cache, targets  # noqa: E402

DEBTAGS = {
    "works-with::audio": "audio",
    "works-with::image": "images",
    "works-with::video": "video",
    "works-with::text": "text",
    "works-with::mail": "email",
    "works-with::db": "databases",
    "use::gameplaying": "games",
    "network::server": "network servers",
    "field::mathematics": "mathematics",
    "field::biology": "biology",
    "hardware::storage": "storage devices",
    "field::finance": "finance",
    "works-with::archive": "archives",
    "use::learning": "education",
    "x11::font": "fonts",
}
TEST_SIZE, LABELED_SIZE = 1500, 500  # the rest (about 2,600 texts) is the unlabeled pool
TOP_FRACTION = 0.1  # the toy teacher says yes to the pool's top 10% of (text, class) cosines


def debtags_descriptions() -> dict[str, frozenset]:
    """{package short description: its subject tags} for descriptions whose packages agree on their tags."""
    seen: dict[str, set] = {}
    for fields in quality.apt_stanzas():
        tags = {t.strip() for t in fields.get("Tag", "").split(",")}
        labels = frozenset(DEBTAGS[t] for t in tags if t in DEBTAGS)
        description = quality.short_description(fields)
        if labels and description:
            seen.setdefault(description, set()).add(labels)
    return {text: next(iter(labels)) for text, labels in seen.items() if len(labels) == 1}


def build_task(directory: str) -> None:
    if os.path.exists(os.path.join(directory, "labeled.jsonl")):
        return
    examples = sorted(debtags_descriptions().items())
    random.Random(0).shuffle(examples)
    test, labeled, pool = (
        examples[:TEST_SIZE],
        examples[TEST_SIZE : TEST_SIZE + LABELED_SIZE],
        examples[TEST_SIZE + LABELED_SIZE :],
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "classes.txt"), "w") as f:
        f.write("\n".join(DEBTAGS.values()) + "\n")
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.write("".join(text + "\n" for text, _ in pool))
    for name, rows in (("test.jsonl", test), ("labeled.jsonl", labeled)):
        with open(os.path.join(directory, name), "w") as f:
            f.write("".join(json.dumps({"text": text, "label": sorted(labels)}) + "\n" for text, labels in rows))


def toy_nli_cache(embedding_cache: str, scale: float, threshold: float | None = None) -> tuple[str, float]:
    """An NLI-format cache beside the embedding cache: entailment (cos - threshold) / scale, contradiction 0, the same
    texts and shards. threshold None: the embedding cache's top-decile cosine (its own scores only)."""
    import pyarrow as pa

    manifest = cache.read_manifest(embedding_cache)
    width = len(manifest["class_names"])
    similarity = np.concatenate([c for _, c in cache.column_chunks(embedding_cache, manifest, "similarity")])
    if threshold is None:
        threshold = float(np.quantile(similarity, 1 - TOP_FRACTION))
    key = hashlib.sha256(f"{manifest['key']} toy-nli {threshold:.6f} {scale:g}".encode()).hexdigest()[:20]
    path = os.path.join(os.path.dirname(embedding_cache), key)
    if cache.is_complete(path):
        return path, threshold
    bounds = [(s["start"], s["stop"]) for s in manifest["shards"]]
    toy = cache.new_manifest(
        key,
        {"toy_nli_from": manifest["key"], "threshold": threshold, "scale": scale},
        bounds,
        teacher={"name_or_path": "toy-nli", "fingerprint": key, "kind": "nli"},
        **{
            k: manifest[k]
            for k in ("hypothesis_template", "class_names", "hypotheses", "data", "num_examples", "shard_size")
        },
        score_columns=["entailment", "contradiction"],
        text_embedding_column=None,
        embedding_model=None,
        precision="fp32",
        command=f"benchmarks/multi_label_calibration.py (from {embedding_cache})",
        versions={},
    )
    cache.begin(path, toy)
    for index, ((start, stop), (_, table)) in enumerate(
        zip(bounds, cache.iter_shards(embedding_cache, manifest, ["index", "text"]))
    ):
        entailment = (similarity[start:stop] - threshold) / scale
        shard = pa.table(
            {
                "index": table.column("index"),
                "text": table.column("text"),
                "entailment": cache.list_array(entailment.astype(np.float32)),
                "contradiction": cache.list_array(np.zeros((stop - start, width), dtype=np.float32)),
            }
        )
        cache.write_shard(path, index, shard, {"start": start, "stop": stop, "forward_passes": 0, "reused_pairs": 0})
    cache.seal(path, toy, max_length=None)
    return path, threshold


def draw_dev(directory: str, per_class: int, seed: int, class_names: list[str], at_random: bool = False) -> str:
    """per_class texts carrying each class (a text drawn for one class counts for all it carries); at_random: as many
    texts as that draw holds, drawn at random (the data's class shares)."""
    with open(os.path.join(directory, "labeled.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rng, chosen = random.Random(seed), set()
    for name in class_names:
        carrying = [i for i, r in enumerate(rows) if name in r["label"]]
        chosen.update(rng.sample(carrying, min(per_class, len(carrying))))
    if at_random:
        chosen = set(random.Random(seed).sample(range(len(rows)), len(chosen)))
    path = os.path.join(directory, f"dev-{per_class}{'-random' if at_random else ''}-seed{seed}.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(rows[i]) + "\n" for i in sorted(chosen)))
    return path


def read_labeled(path: str, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """The texts and 0/1 label matrix of a labeled file, read as evaluate.py and --dev_file read them."""
    from zsdistill import data
    from zsdistill.metrics import encode_labels

    texts, labels = data.read_labeled(path)
    return texts, encode_labels(labels, class_names, True, path)


def figures(probabilities: np.ndarray, true: np.ndarray, class_names: list[str]) -> str:
    from zsdistill.metrics import expected_calibration_error, multi_label_metrics

    m = multi_label_metrics(true, probabilities, class_names)
    predicted = probabilities > 0.5
    per_class = [
        expected_calibration_error(
            np.where(predicted[:, k], probabilities[:, k], 1 - probabilities[:, k]),
            (predicted[:, k] == true[:, k].astype(bool)).astype(float),
        )
        for k in range(true.shape[1])
    ]
    return f"{m['ece']:.3f} / {np.mean(per_class):.3f} / {m['macro_f1']:.3f}"


def main(
    seeds: str | int | tuple = (0, 1),
    per_class: str | int | tuple = 8,
    learning_rate: float = 5e-5,
    teacher_scale: float = targets.SIMILARITY_SCALE,
    dev_at_random: bool = False,
    work_dir: str = "bench/multi_label",
) -> None:
    """Print one markdown row per seed and dev size: ECE / mean per-class ECE / macro-F1 under each calibration."""
    import torch

    import train_student
    from zsdistill import serving
    from zsdistill.models import hardware_name

    directory = os.path.join(work_dir, "data", "debtags-15")
    build_task(directory)
    classes = os.path.join(directory, "classes.txt")
    embedding_cache = quality.teacher_cache(
        os.path.join(directory, "train.txt"), classes, os.path.join(work_dir, "cache"), quality.DEFAULT_TEMPLATE
    )
    nli_cache, threshold = toy_nli_cache(embedding_cache, teacher_scale)
    manifest = cache.read_manifest(nli_cache)
    class_names = manifest["class_names"]
    K = len(class_names)
    pool_texts = [
        t for _, table in cache.iter_shards(nli_cache, manifest, ["text"]) for t in table.column("text").to_pylist()
    ]
    taught = targets.cache_probabilities(nli_cache, manifest, True)
    _, holdout = targets.holdout_split(
        len(pool_texts),
        train_student.StudentOptions.holdout_fraction,
        train_student.StudentOptions.max_holdout_examples,
    )
    test_texts, test_true = read_labeled(os.path.join(directory, "test.jsonl"), class_names)
    print(
        f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}; debtags-15: {len(pool_texts)} "
        f"pool, {len(test_texts)} test texts; toy NLI teacher, threshold {threshold:.4f}, scale {teacher_scale:g}; "
        f"students: train_student.py "
        f"--multi_label --calibrate False --learning_rate {learning_rate:g} {' '.join(quality.STUDENT_ARGS)}\n"
    )
    test_cache, _ = toy_nli_cache(
        quality.teacher_cache(
            os.path.join(directory, "test.jsonl"), classes, os.path.join(work_dir, "cache"), quality.DEFAULT_TEMPLATE
        ),
        teacher_scale,
        threshold,
    )
    test_teacher = targets.cache_probabilities(test_cache, cache.read_manifest(test_cache), True)
    teacher = figures(test_teacher, test_true, class_names)
    print(f"Teacher on the test set (ECE / mean per-class ECE / macro-F1): {teacher}\n")
    print(
        "| seed | dev texts (a class) | none | targets | targets, per class | dev, shared | dev, per class | per-class "
        "temperatures on the dev labels |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in quality.as_list(seeds, int):
        for k in quality.as_list(per_class, int):
            dev_file = draw_dev(directory, k, seed, class_names, dev_at_random)
            output = os.path.join(
                work_dir,
                "students",
                f"scale{teacher_scale:g}-lr{learning_rate:g}-seed{seed}-dev{k}{'random' if dev_at_random else ''}",
            )
            quality.run(
                "train_student.py",
                "--cache",
                nli_cache,
                "--output_dir",
                output,
                "--student_name_or_path",
                quality.minilm(),
                "--overwrite_output_dir",
                "--multi_label",
                "--calibrate",
                "False",
                "--dev_file",
                dev_file,
                *quality.STUDENT_ARGS,
                "--learning_rate",
                str(learning_rate),
                "--seed",
                str(seed),
            )
            dev_texts, dev_true = read_labeled(dev_file, class_names)
            z_dev, z_test = serving.student_logits(output, dev_texts), serving.student_logits(output, test_texts)
            z_holdout = serving.student_logits(output, [pool_texts[i] for i in holdout])
            shared_targets = train_student.fit_logit_temperature(z_holdout, taught[holdout], True)
            shared_dev = train_student.fit_logit_temperature(z_dev, dev_true, True)
            per_class_dev = train_student.per_class_temperatures(z_dev, dev_true)
            per_class_targets = np.array(
                [
                    train_student.fit_logit_temperature(z_holdout[:, [c]], taught[holdout][:, [c]], True)
                    for c in range(K)
                ]
            )
            cells = [
                figures(serving.probabilities(z_test / t, multi_label=True), test_true, class_names)
                for t in (1.0, shared_targets, per_class_targets, shared_dev, per_class_dev)
            ]
            spread = (
                f"{per_class_dev.min():.2f}-{per_class_dev.max():.2f} (shared {shared_dev:.2f}, targets "
                f"{shared_targets:.2f})"
            )
            print(f"| {seed} | {len(dev_texts)} ({k}) | " + " | ".join(cells) + f" | {spread} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
