"""Stage 1 at scale: torchrun across processes, crash-safe resume, corrupt shards, concurrent runs, incremental
classes."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import CLASS_NAMES, ROOT, count_forward_passes

import teacher_infer
from zsdistill import cache
from zsdistill.errors import UserError

TEXTS = [
    f"sentence {i}: "
    + " ".join(["sports", "money", "bread", "rain", "phone", "doctor"][j % 6] for j in range(i % 7 + 1))
    for i in range(26)
]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return tmp_path


def table_of(path):
    manifest, table = cache.load_cache(path)
    return manifest, table.column("text").to_pylist(), cache.score_arrays(manifest, table)


def assert_same_cache(a, b, atol=1e-6):
    manifest_a, texts_a, columns_a = table_of(a)
    manifest_b, texts_b, columns_b = table_of(b)
    assert texts_a == texts_b and manifest_a["class_names"] == manifest_b["class_names"]
    assert list(columns_a) == list(columns_b)
    for name in columns_a:
        np.testing.assert_allclose(columns_a[name], columns_b[name], atol=atol, rtol=0)


def test_torchrun_two_processes_equals_one(corpus, teachers):
    # The last rows repeat the first ones: their shards (rank 0 and 1) copy from both ranks' earlier shards.
    (corpus / "texts.txt").write_text("\n".join(TEXTS + TEXTS[:6]) + "\n")
    args = [
        "--data_file",
        corpus / "texts.txt",
        "--class_names_file",
        corpus / "classes.txt",
        "--teacher_name_or_path",
        teachers["upper"],
        "--shard_size",
        "4",
    ]
    one = teacher_infer.main(
        data_file=str(corpus / "texts.txt"),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        shard_size=4,
        cache_dir=str(corpus / "one"),
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, "teacher_infer.py"),
            *map(str, args),
            "--cache_dir",
            str(corpus / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = result.stdout.strip().splitlines()[-1]
    assert os.path.basename(two) == os.path.basename(one)
    assert "[teacher rank 1]" in result.stderr and "[teacher rank 0]" in result.stderr
    assert result.stderr.count("this process: read 16 of 32 texts") == 2  # each rank reads its own 4 shards only
    assert_same_cache(one, two)
    manifest = json.load(open(os.path.join(two, "manifest.json")))
    assert len(manifest["shards"]) == 8 and all(s["sha256"] for s in manifest["shards"])
    assert manifest["duplicate_rows"] == 6 and manifest["forward_passes"]["computed"] == 26 * len(CLASS_NAMES)
    _, texts, columns = table_of(two)
    for name, values in columns.items():
        np.testing.assert_array_equal(values[26:], values[:6])  # every copy exactly its first copy's scores


def test_torchrun_bad_input_stops_every_rank_with_the_one_line_error(corpus, teachers):
    # Rank 0 alone reads the input before scoring; its error must reach (and stop) the other rank too.
    (corpus / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]) + '{"text": ""}\n')
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, "teacher_infer.py"),
            "--data_file",
            str(corpus / "texts.jsonl"),
            "--class_names_file",
            str(corpus / "classes.txt"),
            "--teacher_name_or_path",
            teachers["upper"],
            "--cache_dir",
            str(corpus / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("texts.jsonl, line 6: column 'text' is empty or not a string") == 2, result.stderr[
        -3000:
    ]
    assert not os.path.exists(corpus / "cache") or not os.listdir(corpus / "cache")


def test_crash_after_first_shard_resumes_without_recomputing_it(corpus, teachers, monkeypatch, capsys):
    kwargs = dict(
        data_file=str(corpus / "texts.txt"),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        shard_size=10,
    )
    clean = teacher_infer.main(cache_dir=str(corpus / "clean"), **kwargs)

    real_write = cache.write_shard

    def write_then_die(cache_path, index, table, record):
        real_write(cache_path, index, table, record)
        raise SystemExit("killed after the first shard")

    monkeypatch.setattr(cache, "write_shard", write_then_die)
    with pytest.raises(SystemExit):
        teacher_infer.main(cache_dir=str(corpus / "crashed"), **kwargs)
    monkeypatch.setattr(cache, "write_shard", real_write)
    crashed = os.path.join(corpus / "crashed", os.listdir(corpus / "crashed")[0])
    assert not cache.is_complete(crashed)  # the manifest does not claim completeness
    with pytest.raises(UserError, match="incomplete: 2 of 3 shards missing"):
        cache.load_cache(crashed)

    counter = count_forward_passes(monkeypatch)
    capsys.readouterr()
    resumed = teacher_infer.main(cache_dir=str(corpus / "crashed"), **kwargs)
    assert counter["pairs"] == (26 - 10) * len(CLASS_NAMES)  # shard 0 was not recomputed
    assert "this process: read 16 of 26 texts" in capsys.readouterr().err  # nor its rows read again
    assert_same_cache(clean, resumed, atol=0)


def test_sigkill_mid_run_then_resume(corpus, teachers):
    """A real kill -9 while shards are being written: the rerun completes the cache and it equals a clean one."""
    many = corpus / "many.txt"
    many.write_text("\n".join(TEXTS * 20) + "\n")  # 520 examples, 52 shards
    args = [
        "teacher_infer.py",
        "--data_file",
        many,
        "--class_names_file",
        corpus / "classes.txt",
        "--teacher_name_or_path",
        teachers["upper"],
        "--shard_size",
        "10",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = subprocess.Popen(
        [sys.executable, *map(str, args), "--cache_dir", corpus / "killed"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = threading.Event()
    while not deadline.wait(0.05):
        done = (
            [f for d in (corpus / "killed").glob("*") for f in os.listdir(d) if f.endswith(".done.json")]
            if (corpus / "killed").exists()
            else []
        )
        if len(done) >= 2 or process.poll() is not None:
            break
    process.kill()
    process.wait()
    rerun = subprocess.run(
        [sys.executable, *map(str, args), "--cache_dir", corpus / "killed"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already complete and reused" in rerun.stderr
    clean = teacher_infer.main(
        data_file=str(many),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        shard_size=10,
        cache_dir=str(corpus / "clean"),
    )
    assert_same_cache(clean, rerun.stdout.strip().splitlines()[-1])


def test_truncated_shard_is_detected_and_recomputed(corpus, teachers, monkeypatch):
    kwargs = dict(
        data_file=str(corpus / "texts.txt"),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        shard_size=10,
        cache_dir=str(corpus / "cache"),
    )
    path = teacher_infer.main(**kwargs)
    reference = {name: values.copy() for name, values in table_of(path)[2].items()}
    shard = os.path.join(path, "shard-00001.arrow")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError, match="shard-00001.arrow"):
        cache.load_cache(path)
    counter = count_forward_passes(monkeypatch)
    assert teacher_infer.main(**kwargs) == path
    assert counter["pairs"] == 10 * len(CLASS_NAMES)  # only the bad shard
    for name, values in table_of(path)[2].items():
        np.testing.assert_array_equal(values, reference[name])


def test_two_runs_at_once_do_not_corrupt_the_cache(corpus, teachers):
    args = [
        "teacher_infer.py",
        "--data_file",
        corpus / "texts.txt",
        "--class_names_file",
        corpus / "classes.txt",
        "--teacher_name_or_path",
        teachers["lower"],
        "--shard_size",
        "3",
        "--cache_dir",
        corpus / "shared",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [o[1][-1500:] for o in outputs]
    paths = {o[0].strip().splitlines()[-1] for o in outputs}
    assert len(paths) == 1
    clean = teacher_infer.main(
        data_file=str(corpus / "texts.txt"),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["lower"],
        shard_size=3,
        cache_dir=str(corpus / "clean"),
    )
    assert_same_cache(clean, paths.pop())  # other thread count than this process: equal within 1e-6


def test_adding_a_class_runs_only_its_pairs(corpus, teachers, monkeypatch):
    common = dict(data_file=str(corpus / "texts.txt"), teacher_name_or_path=teachers["upper"], shard_size=10)
    base = teacher_infer.main(class_names_file=str(corpus / "classes.txt"), cache_dir=str(corpus / "cache"), **common)
    (corpus / "more.txt").write_text(
        "\n".join(["politics"] + CLASS_NAMES[:3] + ["travel"] + CLASS_NAMES[3:]) + "\n"
    )  # new order, two new
    counter = count_forward_passes(monkeypatch)
    grown = teacher_infer.main(class_names_file=str(corpus / "more.txt"), cache_dir=str(corpus / "cache"), **common)
    assert counter["pairs"] == len(TEXTS) * 2
    manifest = json.load(open(os.path.join(grown, "manifest.json")))
    assert manifest["forward_passes"] == {
        "computed": len(TEXTS) * 2,
        "reused_pairs": len(TEXTS) * len(CLASS_NAMES),
        "saved_by_deduplication": 0,
    }
    scratch = teacher_infer.main(class_names_file=str(corpus / "more.txt"), cache_dir=str(corpus / "scratch"), **common)
    assert_same_cache(scratch, grown)
    assert cache.load_cache(base)  # the old cache still works

    # Removing classes costs no forward pass at all.
    (corpus / "fewer.txt").write_text("\n".join(CLASS_NAMES[1:4]) + "\n")
    counter.update(pairs=0, loads=0)
    fewer = teacher_infer.main(class_names_file=str(corpus / "fewer.txt"), cache_dir=str(corpus / "cache"), **common)
    assert counter == {"pairs": 0, "loads": 0}
    _, _, columns = table_of(fewer)
    _, _, base_columns = table_of(base)
    np.testing.assert_array_equal(columns["entailment"], base_columns["entailment"][:, 1:4])


def test_a_second_template_only_computes_its_own_hypotheses(corpus, teachers, monkeypatch):
    common = dict(
        data_file=str(corpus / "texts.txt"),
        class_names_file=str(corpus / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        cache_dir=str(corpus / "cache"),
    )
    teacher_infer.main(**common)
    counter = count_forward_passes(monkeypatch)
    teacher_infer.main(hypothesis_template="This text is about {}.", **common)
    assert counter["pairs"] == len(TEXTS) * len(CLASS_NAMES)  # all hypotheses are new
    counter.update(pairs=0)
    teacher_infer.main(**common)  # back to the first template: a cache hit
    assert counter["pairs"] == 0


def test_embedding_teacher_adds_a_class_with_one_forward_pass(corpus, embedding_teacher, monkeypatch):
    common = dict(data_file=str(corpus / "texts.txt"), teacher_name_or_path=embedding_teacher, shard_size=10)
    base = teacher_infer.main(class_names_file=str(corpus / "classes.txt"), cache_dir=str(corpus / "cache"), **common)
    (corpus / "more.txt").write_text("\n".join(CLASS_NAMES + ["travel"]) + "\n")
    counter = count_forward_passes(monkeypatch)
    grown = teacher_infer.main(class_names_file=str(corpus / "more.txt"), cache_dir=str(corpus / "cache"), **common)
    assert counter["pairs"] == 1  # the new hypothesis only: the texts' embeddings come from the first cache
    scratch = teacher_infer.main(class_names_file=str(corpus / "more.txt"), cache_dir=str(corpus / "scratch"), **common)
    assert_same_cache(scratch, grown)

    def text_embeddings(path):
        _, table = cache.load_cache(path)
        return np.array(table.column("text_embedding").to_pylist())

    assert text_embeddings(grown).shape == (len(TEXTS), 32)  # the tiny encoder's hidden size
    np.testing.assert_allclose(text_embeddings(grown), text_embeddings(scratch), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(text_embeddings(grown), text_embeddings(base))

    # Removing classes: no model load, no forward pass, and the embeddings still travel with the cache.
    (corpus / "fewer.txt").write_text("\n".join(CLASS_NAMES[:2]) + "\n")
    counter.update(pairs=0, loads=0)
    fewer = teacher_infer.main(class_names_file=str(corpus / "fewer.txt"), cache_dir=str(corpus / "cache"), **common)
    assert counter == {"pairs": 0, "loads": 0}
    np.testing.assert_array_equal(text_embeddings(fewer), text_embeddings(base))
