"""A handful of labels (--dev_file): calibration on them, dev metrics at every evaluation step and at the end, and
label names checked against the cache's classes."""

import json
import os

import numpy as np
import pytest
from conftest import keyword_task, make_student_base, run_main, write_toy_cache

import train_student
from zsdistill import card

QUICK = {"max_steps": 4, "per_device_train_batch_size": 8, "use_cpu": True, "disable_tqdm": True, "seed": 0}
CLASSES = ["apple", "river", "guitar"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    texts, labels, columns = keyword_task(200, CLASSES)
    cache_path = write_toy_cache(
        str(root / "cache" / "toy"), texts[:160], CLASSES, {k: v[:160] for k, v in columns.items()}
    )
    dev = root / "dev.jsonl"  # texts the cache does not hold, with their true labels
    dev.write_text(
        "".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[160:], labels[160:]))
    )
    base = make_student_base(str(root / "base"), initializer_range=0.2)
    return root, cache_path, str(dev), base


def test_the_temperature_is_fitted_on_the_dev_labels_and_the_dev_metrics_are_kept(task, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, cache_path, dev, base = task
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        calibrate=True,
        dev_file=dev,
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    assert info["calibration"]["fitted_on"] == "dev labels" and info["calibration"]["dev_examples"] == 40
    dev_metrics = info["metrics"]["dev"]
    assert dev_metrics["examples"] == 40 and {"accuracy", "macro_f1", "ece"} <= set(dev_metrics)
    # The folded scale is the one that makes the dev labels most likely (not the targets on the held-out rows).
    rows = [json.loads(line) for line in open(dev)]
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    encoded = AutoTokenizer.from_pretrained(student)([r["text"] for r in rows], padding=True, return_tensors="pt")
    logits = model(**encoded).logits.detach().numpy() / info["calibration"]["logit_scale"]  # before calibration
    one_hot = np.eye(len(CLASSES))[[CLASSES.index(r["label"]) for r in rows]]
    dev_scale = 1 / train_student.fit_logit_temperature(logits, one_hot, multi_label=False)
    assert info["calibration"]["logit_scale"] == pytest.approx(dev_scale, rel=1e-3)
    assert info["metrics"]["dev_before_calibration"]["ece"] != dev_metrics["ece"]
    text = open(os.path.join(student, card.CARD_FILE)).read()
    assert "| confidence | calibrated on 40 dev labels" in text and "| dev set | 40 labeled texts: accuracy" in text


def test_dev_metrics_at_every_evaluation_step_choose_the_best_model(task, tmp_path):
    _, cache_path, dev, base = task
    output = str(tmp_path / "best")
    train_student.main(
        cache=cache_path,
        output_dir=output,
        student_name_or_path=base,
        dev_file=dev,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        **QUICK,
    )
    state = json.load(open(os.path.join(output, "checkpoint-4", "trainer_state.json")))
    evaluations = [entry for entry in state["log_history"] if "eval_macro_f1" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert all({"eval_accuracy", "eval_ece"} <= set(entry) for entry in evaluations)
    assert state["best_metric"] == max(entry["eval_macro_f1"] for entry in evaluations)


def test_without_a_dev_file_calibration_stays_label_free(task, tmp_path):
    _, cache_path, _, base = task
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        calibrate=True,
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    assert info["calibration"]["fitted_on"] == "held-out targets" and "dev" not in info["metrics"]
    assert "calibrated label-free" in open(os.path.join(student, card.CARD_FILE)).read()


def test_unknown_dev_labels_are_one_line_naming_them(task, tmp_path):
    _, cache_path, _, base = task
    dev = tmp_path / "dev.jsonl"
    dev.write_text(
        json.dumps({"text": "a river", "label": "river"}) + "\n" + json.dumps({"text": "x", "label": "lake"}) + "\n"
    )
    result = run_main(
        "train_student.py",
        "--cache",
        cache_path,
        "--output_dir",
        tmp_path / "s",
        "--student_name_or_path",
        base,
        "--dev_file",
        dev,
    )
    assert result.returncode == 2 and "'lake'" in result.stderr and "known classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_dev_texts_that_are_in_the_cache_are_not_trained_on(task, tmp_path):
    root, cache_path, _, base = task
    from zsdistill import cache

    _, table = cache.load_cache(cache_path)
    texts = table.column("text").to_pylist()
    dev = tmp_path / "dev.jsonl"  # three texts of the training cache itself, as a user's own draw would be
    rows = [{"text": texts[i], "label": "apple"} for i in (3, 50, 90)]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        dev_file=str(dev),
        holdout_fraction=0,
        save_strategy="no",
        **QUICK,
    )
    assert json.load(open(os.path.join(student, card.INFO_FILE)))["metrics"]["dev"]["examples"] == 3
    used = train_student.load_inputs(
        train_student.StudentOptions(cache=cache_path, output_dir="x", dev_file=str(dev), holdout_fraction=0)
    )[2]
    assert len(used) == len(texts) - 3 and not {3, 50, 90} & set(used.tolist())
