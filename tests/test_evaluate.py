"""Stage 3: metrics against hand computation, an end-to-end run, and the unknown-label error."""

import json
import os

import numpy as np
import pytest
from conftest import CLASS_NAMES, CORPUS, make_student_base, run_main, run_script

import evaluate
import teacher_infer
import train_student


def test_single_label_metrics_by_hand():
    true = np.array([0, 0, 1, 1, 2])
    # predictions 0, 1, 1, 1, 0, each with confidence 0.8
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    m = evaluate.single_label_metrics(true, probabilities, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["ece"] == pytest.approx(abs(0.6 - 0.8))  # one bin: accuracy 0.6 at confidence 0.8


def test_ece_two_bins_by_hand():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1.0, 1.0, 1.0, 0.0])
    assert evaluate.expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)


def test_multi_label_metrics_by_hand():
    true = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    probabilities = np.array(
        [[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.7, 0.1, 0.6]]
    )  # predicted: [1,1,0], [0,0,0], [1,0,1]
    m = evaluate.multi_label_metrics(true, probabilities, ["a", "b", "c"])
    assert m["subset_accuracy"] == pytest.approx(2 / 3)
    # tp=4, fp=0, fn=1 -> micro P=1, R=0.8, F1=8/9
    assert m["micro_f1"] == pytest.approx(8 / 9)
    # per class F1: a 1.0, b (tp1, fn1) 2/3, c 1.0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert m["outcomes"][1] == [1, 0, 1, 1]  # b: tn, fp, fn, tp


def test_resampled_scores_match_the_metrics_and_intervals_narrow_with_more_texts():
    from zsdistill.metrics import accuracy_and_macro_f1, bootstrap_intervals

    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 400)
    true[true == 3] = 2  # class 3 has no text; predicted for a few
    probabilities = rng.dirichlet(np.ones(4), 400)
    probabilities[np.arange(400) % 3 == 0, true[np.arange(400) % 3 == 0]] += 1.0  # right a third of the time or more
    names = ["a", "b", "c", "d"]
    whole = evaluate.single_label_metrics(true, probabilities, names)
    assert accuracy_and_macro_f1(probabilities.argmax(1), true, np.arange(400), 4) == pytest.approx(
        (whole["accuracy"], whole["macro_f1"])
    )
    rows = rng.integers(0, 400, 400)  # one resample, as the bootstrap draws it
    again = evaluate.single_label_metrics(true[rows], probabilities[rows], names)
    assert accuracy_and_macro_f1(probabilities.argmax(1), true, rows, 4) == pytest.approx(
        (again["accuracy"], again["macro_f1"])
    )
    many = (rng.random((300, 3)) < 0.3).astype(int)
    scores = rng.random((300, 3))
    multi = evaluate.multi_label_metrics(many, scores, names[:3])
    assert accuracy_and_macro_f1(scores > 0.5, many, np.arange(300), 3) == pytest.approx(
        (multi["subset_accuracy"], multi["macro_f1"])
    )
    # The interval holds the figure, is the same for a seed, and is about half as wide on four times the texts.
    small = bootstrap_intervals(true[:100], probabilities[:100], False)
    large = bootstrap_intervals(true, probabilities, False)
    assert large == bootstrap_intervals(true, probabilities, False) and large["resamples"] == 1000
    assert large["accuracy"][0] < whole["accuracy"] < large["accuracy"][1]
    assert large["macro_f1"][0] < whole["macro_f1"] < large["macro_f1"][1]
    ratio = (small["accuracy"][1] - small["accuracy"][0]) / (large["accuracy"][1] - large["accuracy"][0])
    assert 1.5 < ratio < 2.7
    assert set(bootstrap_intervals(many, scores, True)) == {"resamples", "subset_accuracy", "macro_f1"}


def test_agreement():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    b = np.array([[0.7, 0.3], [0.4, 0.6], [0.3, 0.7]])
    assert evaluate.agreement(a, b, multi_label=False) == pytest.approx(2 / 3)
    assert evaluate.agreement(a, b, multi_label=True) == pytest.approx(4 / 6)


@pytest.fixture
def labeled(tmp_path):
    rows = [{"text": t, "label": CLASS_NAMES[i % len(CLASS_NAMES)]} for i, t in enumerate(CORPUS * 2)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    return str(path), str(tmp_path / "classes.txt")


def distil(teacher: str, labeled, tmp_path, max_steps: int) -> tuple[str, str]:
    """Stage 1 on the labeled texts, then a tiny student from that cache: (cache, student directory)."""
    test_file, classes_file = labeled
    cache_path = teacher_infer.main(
        data_file=test_file,
        class_names_file=classes_file,
        teacher_name_or_path=teacher,
        cache_dir=str(tmp_path / "cache"),
    )
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        max_steps=max_steps,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return cache_path, student


def test_end_to_end_report(teachers, labeled, tmp_path):
    test_file, _ = labeled
    cache_path, student = distil(teachers["upper"], labeled, tmp_path, max_steps=2)
    out = tmp_path / "report"
    result = run_script(
        "evaluate.py",
        "--model",
        student,
        "--test_file",
        test_file,
        "--teacher_cache",
        cache_path,
        "--output_dir",
        out,
        "--time_teacher",
        "--time_teacher_samples",
        "4",
        "--no_cuda",
    )
    assert result.returncode == 0, result.stderr
    report = json.load(open(out / "report.json"))
    for who in ("student", "teacher"):
        m = report[who]["metrics"]
        confusion = np.array(m["confusion_matrix"])
        assert confusion.shape == (6, 6) and confusion.sum() == 16
        assert m["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
        assert sorted(m["per_class"]) == sorted(CLASS_NAMES)
        assert 0 <= m["ece"] <= 1 and 0 <= m["macro_f1"] <= 1
        assert (out / f"confusion_{who}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["teacher"]["cache_key"] == os.path.basename(cache_path)
    assert report["num_examples"] == 16 and len(report["test_file_sha256"]) == 64
    speed = report["speed"]
    assert speed["student_examples_per_second"] > 0 and speed["teacher_examples_per_second"] > 0
    # The speedup is the student's rate over the timed teacher's, and the report says how many texts timed it.
    assert speed["teacher_timed_examples"] == 4 and speed["speedup"] > 0
    assert (
        f"Student speedup over the live zero-shot teacher: {speed['speedup']:.1f}x." in (out / "report.md").read_text()
    )
    assert report["hardware"].endswith(" threads)")  # the CPU's model name and thread count (--no_cuda)
    markdown = (out / "report.md").read_text()
    assert "| metric | teacher | student |" in markdown and "| accuracy |" in markdown
    student_interval = report["student"]["metrics"]["interval_95"]["accuracy"]
    assert student_interval[0] <= report["student"]["metrics"]["accuracy"] <= student_interval[1]
    assert "95% intervals over 1,000 bootstrap resamples of the 16 test texts" in markdown
    assert f"student {student_interval[0]:.3f}-{student_interval[1]:.3f}" in markdown
    assert "| metric | teacher | student |" in result.stdout
    # The label-free report of the test cache follows, each of its warnings checked against the labels.
    assert "## Look before you train" in markdown and (out / "shares.png").exists()
    looked = report["cache_report"]
    assert (
        looked["num_examples"] == 16 and sum(c["predicted"] for c in looked["teacher_view"]["classes"].values()) == 16
    )
    assert all("labels" in w for w in looked["warnings"] if w["kind"] not in ("truncated", "flat_scores"))


def test_unknown_labels_are_an_error(teachers, labeled, tmp_path):
    _, student = distil(teachers["two"], labeled, tmp_path, max_steps=1)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sports\tA match.\ncooking\tA pie.\ngardening\tA rose.\n")
    result = run_main("evaluate.py", "--model", student, "--test_file", bad, "--output_dir", tmp_path / "report")
    assert result.returncode == 2
    assert "labels not among the model's classes: 'cooking', 'gardening'" in result.stderr
    assert "known classes: 'sports'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "report").exists()


def test_multi_label_end_to_end(tmp_path):
    from conftest import keyword_task, write_toy_cache

    classes = ["apple", "river", "guitar"]
    texts, labels, columns = keyword_task(40, classes)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, classes, columns)
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        multi_class=True,
        max_steps=2,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    test_file = tmp_path / "test.jsonl"
    rows = [
        {"text": t, "label": [classes[y]] + (["river"] if i % 3 == 0 and classes[y] != "river" else [])}
        for i, (t, y) in enumerate(zip(texts, labels))
    ]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate.main(
        model=student,
        test_file=str(test_file),
        teacher_cache=cache_path,
        output_dir=str(tmp_path / "report"),
        no_cuda=True,
    )
    assert report["multi_label"] is True
    for who in ("student", "teacher"):
        m = report[who]["metrics"]
        assert set(m) >= {"subset_accuracy", "micro_f1", "macro_f1", "ece", "per_class", "outcomes"}
        # The per-class outcomes agree with the predictions the report's metrics came from.
        for i, c in enumerate(classes):
            tn, fp, fn, tp = m["outcomes"][i]
            assert tn + fp + fn + tp == len(rows) and tp + fn == m["per_class"][c]["support"]
            assert m["per_class"][c]["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)
            assert m["per_class"][c]["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
        assert sum(m["per_class"][c]["support"] for c in classes) == sum(len(r["label"]) for r in rows)
        assert (tmp_path / "report" / f"confusion_{who}.png").exists()
    assert "| subset accuracy |" in (tmp_path / "report" / "report.md").read_text()
