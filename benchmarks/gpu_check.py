"""GPU check (run on a machine with GPUs): torchrun over all GPUs with --bf16 against a CPU fp32 cache.

Builds a random BERT-base NLI teacher (as benchmarks/teacher_throughput.py does), runs stage 1 with
`torchrun --nproc_per_node <GPUs> teacher_infer.py --bf16` on WordNet texts, runs the same command on the
CPU in fp32 (--no_cuda) on the first --cpu_texts texts, and compares probabilities rebuilt from both caches.

    python benchmarks/gpu_check.py --texts 4000 --cpu_texts 256
"""

import os
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import teacher_throughput  # noqa: E402

from zsdistill import cache, targets  # noqa: E402


def run_stage1(args: list[str], launcher: list[str]) -> tuple[str, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [*launcher, os.path.join(ROOT, "teacher_infer.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))},
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"stage 1 failed:\n{result.stderr[-3000:]}")
    print("\n".join(line for line in result.stderr.splitlines() if line.startswith("[teacher")), flush=True)
    return result.stdout.strip().splitlines()[-1], elapsed


def main(texts: int = 4000, cpu_texts: int = 256, k: int = 8, cpu_dry_run: bool = False) -> None:
    """Args:
    texts: texts scored on the GPUs.
    cpu_texts: the first texts, also scored on the CPU in fp32 for the comparison.
    k: number of class names.
    cpu_dry_run: check this script without a GPU (2 CPU processes, fp32 instead of bf16).
    """
    gpus = torch.cuda.device_count() if not cpu_dry_run else 2
    if not gpus:
        sys.exit("error: no GPU here; this check needs one (or pass --cpu_dry_run)")
    precision_flags = ["--bf16"] if not cpu_dry_run else ["--no_cuda"]
    print(
        f"GPUs: {gpus} x {torch.cuda.get_device_name(0) if not cpu_dry_run else 'CPU (dry run)'}; torch "
        f"{torch.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        teacher_dir, _ = teacher_throughput.build_models(directory, k)
        sample = teacher_throughput.corpus(texts)
        with open(os.path.join(directory, "texts.txt"), "w") as f:
            f.write("\n".join(sample) + "\n")
        with open(os.path.join(directory, "head.txt"), "w") as f:
            f.write("\n".join(sample[:cpu_texts]) + "\n")
        with open(os.path.join(directory, "classes.txt"), "w") as f:
            f.write("\n".join(teacher_throughput.CLASS_NAMES[:k]) + "\n")
        common = [
            "--class_names_file",
            os.path.join(directory, "classes.txt"),
            "--teacher_name_or_path",
            teacher_dir,
            "--shard_size",
            "1000",
        ]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        gpu_cache, gpu_seconds = run_stage1(
            [
                "--data_file",
                os.path.join(directory, "texts.txt"),
                "--cache_dir",
                os.path.join(directory, "gpu"),
                *precision_flags,
                "--teacher_batch_size",
                "256",
                "--max_batch_tokens",
                "65536",
                *common,
            ],
            torchrun,
        )
        cpu_cache, cpu_seconds = run_stage1(
            [
                "--data_file",
                os.path.join(directory, "head.txt"),
                "--cache_dir",
                os.path.join(directory, "cpu"),
                "--no_cuda",
                *common,
            ],
            [sys.executable],
        )
        gpu_manifest, gpu_table = cache.load_cache(gpu_cache)
        cpu_manifest, cpu_table = cache.load_cache(cpu_cache)
        gpu_columns = {n: v[:cpu_texts] for n, v in cache.score_arrays(gpu_manifest, gpu_table).items()}
        cpu_columns = cache.score_arrays(cpu_manifest, cpu_table)
        assert gpu_table.column("text").to_pylist()[:cpu_texts] == cpu_table.column("text").to_pylist()
        pairs = texts * k
        print(
            f"torchrun x{gpus} --bf16: {texts} texts x {k} classes = {pairs} pairs in {gpu_seconds:.1f}s wall "
            f"(model load and process start included): {pairs / gpu_seconds:.0f} pairs/s"
        )
        print(
            f"CPU fp32 (--no_cuda, {torch.get_num_threads()} threads): {cpu_texts * k} pairs in {cpu_seconds:.1f}s: "
            f"{cpu_texts * k / cpu_seconds:.1f} pairs/s"
        )
        for multi_label in (False, True):
            p_gpu = targets.teacher_probabilities(gpu_columns, multi_label)
            p_cpu = targets.teacher_probabilities(cpu_columns, multi_label)
            top1 = (p_gpu.argmax(1) == p_cpu.argmax(1)).mean()
            print(
                f"{'multi' if multi_label else 'single'}-label probabilities, bf16 GPU vs fp32 CPU: max |diff| "
                f"{np.abs(p_gpu - p_cpu).max():.4f}, "
                f"mean |diff| {np.abs(p_gpu - p_cpu).mean():.5f}, top-1 agreement {top1:.1%}"
            )
        print(f"max |logit diff| entailment: {np.abs(gpu_columns['entailment'] - cpu_columns['entailment']).max():.4f}")


if __name__ == "__main__":
    fire.Fire(main)
