"""The student's model card (README.md, the hub's format) and the evaluation's reliability diagram."""

import hashlib
import json
import os

import numpy as np
import pytest
from conftest import keyword_task, make_student_base, write_toy_cache

import evaluate
import train_student
from zsdistill import card

QUICK = dict(max_steps=3, per_device_train_batch_size=8, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
CLASSES = ["apple", "river", "guitar"]


@pytest.fixture
def student_and_test(tmp_path):
    texts, labels, columns = keyword_task(120, CLASSES)
    cache_path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, CLASSES, columns)
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        temperature=2.0,
        **QUICK,
    )
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[:40], labels[:40]))
    )
    test_cache = write_toy_cache(
        str(tmp_path / "cache" / "test"), texts[:40], CLASSES, {k: v[:40] for k, v in columns.items()}
    )
    return student, str(test), test_cache


def test_the_card_parses_and_carries_the_facts(student_and_test):
    from huggingface_hub import ModelCard

    student, _, _ = student_and_test
    model_card = ModelCard.load(os.path.join(student, card.CARD_FILE))
    data = model_card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert "zero-shot-distillation" in data["tags"] and "base_model" not in data  # a local base has no hub id to link
    info = json.load(open(os.path.join(student, "distill_info.json")))
    text = model_card.text
    for fact in (
        "`toy`",
        "`{}`",
        "`apple`, `river`, `guitar`",
        "| unlabeled texts | 120 |",
        "| temperature | 2.0 |",
        "single-label (softmax)",
        f"{info['metrics']['holdout']['agreement']:.4f} on {info['metrics']['holdout']['examples']} held-out texts",
        "the cache holds no text embeddings",
        'pipeline("text-classification"',
    ):
        assert fact in text, fact


def test_a_hub_base_model_is_linked():
    info = {"student_base": "distilbert-base-uncased", "multi_label": True}
    data = card._card_data(info).to_dict()
    assert data["base_model"] == "distilbert-base-uncased" and "multi-label" in data["tags"]


def test_evaluate_adds_its_results_to_the_card_and_touches_nothing_else(student_and_test, tmp_path):
    from huggingface_hub import ModelCard

    student, test, test_cache = student_and_test

    def others() -> dict:
        return {
            name: hashlib.sha256(open(os.path.join(student, name), "rb").read()).hexdigest()
            for name in os.listdir(student)
            if name != card.CARD_FILE and os.path.isfile(os.path.join(student, name))
        }

    before = others()
    for run in range(2):  # a second evaluation replaces the section, it does not add another
        report = evaluate.main(
            model=student, test_file=test, teacher_cache=test_cache, output_dir=str(tmp_path / f"report{run}")
        )
    text = ModelCard.load(os.path.join(student, card.CARD_FILE)).text
    assert text.count(card.EVALUATION_HEADING) == 1 and "`test.jsonl`" in text
    student_m, teacher_m = report["student"]["metrics"], report["teacher"]["metrics"]
    (low, high), (t_low, t_high) = student_m["interval_95"]["accuracy"], teacher_m["interval_95"]["accuracy"]
    assert (
        f"| accuracy | {student_m['accuracy']:.4f} ({low:.3f}-{high:.3f}) | "
        f"{teacher_m['accuracy']:.4f} ({t_low:.3f}-{t_high:.3f}) |" in text
    )
    assert "In brackets: 95% intervals over 1,000 bootstrap resamples of the test texts." in text
    assert f"| ECE (15 bins) | {report['student']['metrics']['ece']:.4f} |" in text
    assert others() == before


def test_a_read_only_student_directory_is_left_alone(student_and_test, tmp_path, monkeypatch):
    student, test, test_cache = student_and_test
    original = open(os.path.join(student, card.CARD_FILE)).read()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if str(path).startswith(student) and mode & os.W_OK else real_access(path, mode),
    )
    evaluate.main(model=student, test_file=test, teacher_cache=test_cache, output_dir=str(tmp_path / "report"))
    assert open(os.path.join(student, card.CARD_FILE)).read() == original


def test_the_report_links_a_reliability_diagram(student_and_test, tmp_path):
    student, test, test_cache = student_and_test
    evaluate.main(model=student, test_file=test, teacher_cache=test_cache, output_dir=str(tmp_path / "report"))
    markdown = open(tmp_path / "report" / "report.md").read()
    for png in ("reliability.png", "confusion_student.png", "confusion_teacher.png"):
        assert f"]({png})" in markdown and os.path.getsize(tmp_path / "report" / png) > 10_000


def test_reliability_diagram_bins_match_the_ece(tmp_path, monkeypatch):
    """The diagram's points are the ECE's bins: the per-bin accuracy and confidence it plots give back the reported
    ECE."""
    import matplotlib.axes

    plotted = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda self, x, y, *a, **k: (plotted.append((np.asarray(x), np.asarray(y))), real_plot(self, x, y, *a, **k))[1],
    )
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4) * 0.5, size=400)
    true = rng.integers(4, size=400)
    evaluate.reliability_png(str(tmp_path / "r.png"), {"student": probabilities}, true, multi_label=False)
    confidence, accuracy = plotted[-1]
    ece = evaluate.expected_calibration_error(probabilities.max(1), (probabilities.argmax(1) == true).astype(float))
    edges = np.linspace(0, 1, evaluate.ECE_BINS + 1)
    which = np.clip(np.digitize(probabilities.max(1), edges[1:-1], right=True), 0, evaluate.ECE_BINS - 1)
    shares = np.bincount(which, minlength=evaluate.ECE_BINS)[np.unique(which)] / 400
    assert float((shares * np.abs(accuracy - confidence)).sum()) == pytest.approx(ece, abs=1e-9)


def test_a_student_from_the_previous_release_still_reads(student_and_test, tmp_path):
    """distill_info.json written before the options became a dataclass (the demo student of 73fb45c): the card
    renders from it, export_student.py finds its held-out rows' settings, and today's file keeps every key it had,
    with the same kind of value."""
    old = json.load(open(os.path.join(os.path.dirname(__file__), "data", "distill_info_before_options.json")))
    assert "## How to use" in card.render(old)
    student, _, _ = student_and_test
    new = json.load(open(os.path.join(student, "distill_info.json")))
    for key, value in old.items():
        assert key in new, key
        assert isinstance(new[key], type(value)) or value is None or new[key] is None, key
    for key in ("holdout_fraction", "max_holdout_examples", "cache"):  # what export_student.held_out_texts reads
        assert key in old
