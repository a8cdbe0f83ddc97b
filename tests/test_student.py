"""Stage 2: target math, students trained from a cache alone, learning a toy teacher, flag errors."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, CORPUS, keyword_task, make_student_base, run_script, write_toy_cache

import teacher_infer
import train_student
from zsdistill import targets

QUICK = dict(max_steps=2, per_device_train_batch_size=4, use_cpu=True, save_strategy="no", disable_tqdm=True)


def test_target_math_against_hand_computation():
    entailment = np.array([[1.0, 2.0, 3.0]])
    contradiction = np.array([[0.0, 2.0, 5.0]])
    e = [math.exp(1), math.exp(2), math.exp(3)]
    np.testing.assert_allclose(targets.single_label_targets(entailment, 1.0), [[x / sum(e) for x in e]], rtol=1e-6)
    e2 = [math.exp(0.5), math.exp(1.0), math.exp(1.5)]
    np.testing.assert_allclose(targets.single_label_targets(entailment, 2.0), [[x / sum(e2) for x in e2]], rtol=1e-6)
    # Multi-label: per class softmax over (contradiction, entailment) / T, entailment side.
    by_hand = [math.exp(1) / (math.exp(1) + math.exp(0)), 0.5, math.exp(3) / (math.exp(3) + math.exp(5))]
    np.testing.assert_allclose(targets.multi_label_targets(entailment, contradiction, 1.0), [by_hand], rtol=1e-6)
    by_hand_t2 = [math.exp(0.5) / (math.exp(0.5) + 1), 0.5, math.exp(1.5) / (math.exp(1.5) + math.exp(2.5))]
    np.testing.assert_allclose(targets.multi_label_targets(entailment, contradiction, 2.0), [by_hand_t2], rtol=1e-6)
    # Similarity: softmax of cosine / (scale * T).
    similarity = np.array([[0.1, 0.3]])
    s = [math.exp(0.1 / 0.05), math.exp(0.3 / 0.05)]
    np.testing.assert_allclose(targets.similarity_targets(similarity, 1.0), [[x / sum(s) for x in s]], rtol=1e-6)
    probabilities = targets.teacher_probabilities(
        {"entailment": entailment, "contradiction": contradiction}, multi_label=False, temperature=2.0
    )
    np.testing.assert_allclose(probabilities, targets.single_label_targets(entailment, 2.0))


def test_two_students_from_one_cache_without_the_teacher(teachers, corpus_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    teacher_dir = shutil.copytree(teachers["upper"], tmp_path / "teacher")
    data_file, classes_file = corpus_files
    cache_path = teacher_infer.main(
        data_file=data_file,
        class_names_file=classes_file,
        teacher_name_or_path=str(teacher_dir),
        cache_dir=str(tmp_path / "cache"),
    )
    shutil.rmtree(teacher_dir)  # stage 2 must never need it
    base = make_student_base(str(tmp_path / "base"))
    single = train_student.main(
        cache=cache_path, output_dir=str(tmp_path / "single"), student_name_or_path=base, temperature=1.0, **QUICK
    )
    multi = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "multi"),
        student_name_or_path=base,
        temperature=2.0,
        multi_label=True,
        **QUICK,
    )

    text = CORPUS[0]
    for directory, multi_label in ((single, False), (multi, True)):
        info = json.load(open(os.path.join(directory, "distill_info.json")))
        assert info["multi_label"] is multi_label and info["temperature"] == (2.0 if multi_label else 1.0)
        assert info["cache_key"] == os.path.basename(cache_path) and info["student_base"] == base
        assert "holdout" in info["metrics"] and "training_arguments" in info
        classifier = pipeline("text-classification", model=directory, top_k=None)
        scores = {r["label"]: r["score"] for r in classifier([text])[0]}
        assert sorted(scores) == sorted(CLASS_NAMES)
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        expected = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
        np.testing.assert_allclose([scores[c] for c in CLASS_NAMES], expected.numpy(), atol=1e-5)
        if not multi_label:
            assert abs(sum(scores.values()) - 1) < 1e-5
        assert model.config.problem_type == (
            "multi_label_classification" if multi_label else "single_label_classification"
        )


def test_tiny_student_learns_a_toy_teacher(tmp_path):
    classes = ["apple", "river", "guitar", "soccer"]
    texts, labels, columns = keyword_task(400, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    base = make_student_base(str(tmp_path / "base"))
    output = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=base,
        holdout_fraction=0.2,
        num_train_epochs=15,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    holdout = json.load(open(os.path.join(output, "distill_info.json")))["metrics"]["holdout"]
    assert holdout["examples"] == 80
    assert holdout["agreement"] >= 0.7, holdout  # chance is 0.25
    # Tokenization is cached per student tokenizer: the next run reuses it.
    assert len(os.listdir(os.path.join(cache_path, "tokenized"))) >= 1


def test_multi_label_student_learns_two_true_classes(tmp_path):
    """BCE can express two true classes at once (softmax cross-entropy could not)."""
    classes = ["apple", "river", "guitar"]
    rng = np.random.default_rng(0)
    texts, truth = [], []
    for _ in range(300):
        present = rng.random(3) < 0.5
        words = ["the", "a", "of", "and"] + [c for c, p in zip(classes, present) if p]
        rng.shuffle(words)
        texts.append(" ".join(words))
        truth.append(present)
    truth = np.array(truth)
    entailment = np.where(truth, 3.0, -3.0).astype(np.float32)
    cache_path = write_toy_cache(
        str(tmp_path / "cache" / "multi"), texts, classes, {"entailment": entailment, "contradiction": -entailment}
    )
    output = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        multi_label=True,
        holdout_fraction=0.2,
        num_train_epochs=60,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    holdout = json.load(open(os.path.join(output, "distill_info.json")))["metrics"]["holdout"]
    assert holdout["agreement"] >= 0.75 and holdout["f1_vs_teacher"] >= 0.75, holdout  # chance: 0.5


def test_holdout_is_capped_and_the_cap_keeps_the_rows_it_keeps():
    _, full = train_student.holdout_split(100_000, 0.05)
    train, capped = train_student.holdout_split(100_000, 0.05, max_rows=1000)
    assert len(full) == 5000 and len(capped) == 1000 and len(train) == 99_000
    assert set(capped) <= set(full) and not set(capped) & set(train)


def test_holdout_split_is_deterministic_and_disjoint():
    train_a, hold_a = train_student.holdout_split(1000, 0.05)
    train_b, hold_b = train_student.holdout_split(1000, 0.05)
    assert (hold_a == hold_b).all() and len(hold_a) == 50
    assert not set(train_a) & set(hold_a) and len(train_a) + len(hold_a) == 1000


def test_unknown_flag_is_an_error_naming_it(tmp_path):
    classes = ["apple", "river"]
    texts, _, columns = keyword_task(20, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    result = run_script(
        "train_student.py", "--cache", cache_path, "--output_dir", tmp_path / "out", "--learning_rat", "1e-4"
    )
    assert result.returncode == 2
    assert "unknown flag --learning_rat" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_two_processes_trains_a_student(tmp_path):
    """Multi-process training is the Trainer's (DDP over gloo on CPUs here, NCCL on GPUs)."""
    import subprocess
    import sys

    from conftest import ROOT

    classes = ["apple", "river"]
    texts, _, columns = keyword_task(64, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    base = make_student_base(str(tmp_path / "base"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, "train_student.py"),
            "--cache",
            cache_path,
            "--output_dir",
            str(tmp_path / "student"),
            "--student_name_or_path",
            base,
            "--use_cpu",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
            "--ddp_find_unused_parameters",
            "False",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    # The whole of torchrun's stderr (every rank's) stays in tmp_path: its summary alone fills the message's tail.
    (tmp_path / "torchrun.stderr").write_text(result.stderr)
    assert result.returncode == 0, f"{tmp_path / 'torchrun.stderr'}:\n{result.stderr[-3000:]}"
    info = json.load(open(tmp_path / "student" / "distill_info.json"))
    # 61 training rows in global batches of 2 ranks x 4 = 8 steps per epoch: 2 steps are a quarter epoch
    # (one process would take 16 steps per epoch, so 2 steps would be 0.125).
    assert float(info["metrics"]["train"]["epoch"]) == 0.25, info["metrics"]["train"]
    assert os.path.exists(tmp_path / "student" / "model.safetensors")


def test_read_only_cache_tokenizes_into_the_user_cache(tmp_path, monkeypatch):
    classes = ["apple", "river"]
    texts, _, columns = keyword_task(20, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path).startswith(cache_path) else real_access(path, mode)
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        **QUICK,
    )
    assert os.listdir(tmp_path / "home" / ".cache" / "zsdistill" / "tokenized" / "toy")


def test_same_seed_same_student(tmp_path):
    from safetensors.torch import load_file

    classes = ["apple", "river", "stone"]
    texts, _, columns = keyword_task(40, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    base = make_student_base(str(tmp_path / "base"))

    def weights(name: str, seed: int) -> dict:
        output = train_student.main(
            cache=cache_path, output_dir=str(tmp_path / name), student_name_or_path=base, seed=seed, **QUICK
        )
        return load_file(os.path.join(output, "model.safetensors"))

    first, again, other = weights("a", 7), weights("b", 7), weights("c", 8)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)  # the new head included
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])


def test_student_counts_the_texts_it_cuts(tmp_path, capsys):
    # "cat" is one WordPiece token; with [CLS] and [SEP], max_length 16 holds 14 of them.
    lengths = [3, 14, 15, 40, 14, 2, 15, 1]
    texts = [" ".join(["cat"] * n) for n in lengths]
    columns = {"entailment": np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(texts), 1))}
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, ["a", "b"], columns, shard_size=3)
    base = make_student_base(str(tmp_path / "base"))
    output = train_student.main(
        cache=cache_path, output_dir=str(tmp_path / "student"), student_name_or_path=base, max_length=16, **QUICK
    )
    assert json.load(open(os.path.join(output, "distill_info.json")))["truncated_texts"] == 3
    assert "long texts: 3 of 8 (37.5%) are longer than the student's 16 tokens and were cut" in capsys.readouterr().err


def _recorded_optimizer(tmp_path, name: str, **kwargs):
    """Train a tiny student for QUICK steps; return its optimizer's param groups as (names, lr, weight decay) and the
    info."""
    classes = ["apple", "river", "stone"]
    texts, _, columns = keyword_task(40, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    seen = {}

    class Recording(train_student.DistillationTrainer):
        def create_optimizer(self, model=None):
            seen["optimizer"] = super().create_optimizer(model)
            seen["names"] = {id(p): n for n, p in self.model.named_parameters()}
            return seen["optimizer"]

    original, train_student.DistillationTrainer = train_student.DistillationTrainer, Recording
    try:
        output = train_student.main(
            cache=cache_path,
            output_dir=str(tmp_path / name),
            student_name_or_path=make_student_base(str(tmp_path / "base")),
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            seed=0,
            **kwargs,
            **QUICK,
        )
    finally:
        train_student.DistillationTrainer = original
    groups = [
        (sorted(seen["names"][id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in seen["optimizer"].param_groups
    ]
    return groups, json.load(open(os.path.join(output, "distill_info.json"))), output


def test_new_head_learns_at_the_factor_times_the_learning_rate(tmp_path):
    groups, info, output = _recorded_optimizer(tmp_path, "student", head_learning_rate_factor=10, weight_decay=0.01)
    head = ["classifier.bias", "classifier.weight"]  # what the base checkpoint lacks: the new K-way layer
    assert info["head_learning_rate"] == {"factor": 10.0, "parameters": head}
    card = open(os.path.join(output, "README.md")).read()
    assert (
        "| learning rates | 10 x the learning rate for the new head (`classifier.bias`, `classifier.weight`) |" in card
    )
    names = [n for group_names, _, _ in groups for n in group_names]
    assert len(names) == len(set(names)) and all(groups)  # every parameter in one group, no group empty
    for group_names, lr, weight_decay in groups:
        is_head = {n in head for n in group_names}
        assert len(is_head) == 1, group_names  # the head never shares a group with the body
        assert lr == pytest.approx(1e-2 if is_head.pop() else 1e-3), group_names
    decay = {n: wd for group_names, _, wd in groups for n in group_names}
    assert (
        decay["classifier.weight"] == 0.01 and decay["classifier.bias"] == 0.0
    )  # the Trainer's weight-decay split is kept


def test_head_learning_rate_factor_1_is_the_trainers_own_optimizer(tmp_path):
    """Factor 1 leaves the Trainer's optimizer as it is: the same groups, and the same weights after training as
    the plain transformers Trainer.create_optimizer."""
    from safetensors.torch import load_file
    from transformers import Trainer

    groups, info, output = _recorded_optimizer(tmp_path, "one", head_learning_rate_factor=1)
    assert info["head_learning_rate"]["factor"] == 1.0 and len(groups) == 2 and {lr for _, lr, _ in groups} == {1e-3}
    hooked = train_student.DistillationTrainer.create_optimizer
    train_student.DistillationTrainer.create_optimizer = Trainer.create_optimizer
    try:
        _, _, plain = _recorded_optimizer(tmp_path, "plain", head_learning_rate_factor=1)
    finally:
        train_student.DistillationTrainer.create_optimizer = hooked
    first, second = (
        load_file(os.path.join(output, "model.safetensors")),
        load_file(os.path.join(plain, "model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_low_learning_rate_learns_through_the_faster_head(tmp_path):
    """A body whose features already tell the texts apart (as a pretrained one does) and a new random head: at a
    learning rate too low for that head to move in a short run, factor 1 stays at chance and the default factor
    learns the toy teacher."""
    classes = ["apple", "river", "guitar", "soccer"]
    labels = np.random.default_rng(0).integers(len(classes), size=240)
    entailment = np.full((240, len(classes)), -3.0, dtype=np.float32)
    entailment[np.arange(240), labels] = 3.0
    cache_path = write_toy_cache(
        str(tmp_path / "cache" / "toy"),
        [classes[k] for k in labels],
        classes,
        {"entailment": entailment, "contradiction": -entailment},
    )
    base = make_student_base(str(tmp_path / "base"), initializer_range=0.2)
    agreement = {}
    for factor in (1, train_student.HEAD_LEARNING_RATE_FACTOR):
        output = train_student.main(
            cache=cache_path,
            output_dir=str(tmp_path / f"student-{factor}"),
            student_name_or_path=base,
            head_learning_rate_factor=factor,
            refine=False,
            calibrate=False,
            holdout_fraction=0.25,
            num_train_epochs=4,
            learning_rate=1e-4,
            per_device_train_batch_size=16,
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        agreement[factor] = json.load(open(os.path.join(output, "distill_info.json")))["metrics"]["holdout"][
            "agreement"
        ]
    assert agreement[1] <= 0.5 and agreement[train_student.HEAD_LEARNING_RATE_FACTOR] >= 0.9, (
        agreement
    )  # chance is 0.25


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_bad_head_learning_rate_factor_is_a_one_line_error(tmp_path, value):
    from conftest import run_main

    classes = ["apple", "river"]
    texts, _, columns = keyword_task(20, classes)
    path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    result = run_main(
        "train_student.py", "--cache", path, "--output_dir", tmp_path / "out", "--head_learning_rate_factor", value
    )
    assert result.returncode == 2 and "--head_learning_rate_factor must be a positive number" in result.stderr, (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
