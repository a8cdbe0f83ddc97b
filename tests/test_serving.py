"""ONNX export and serving: parity with the PyTorch student, calibration kept, multi-label sigmoid kept, a failed export
leaving nothing behind, a missing runtime named with its install command, and evaluate.py --onnx."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import keyword_task, make_student_base, run_main, write_toy_cache

import evaluate
import train_student
from zsdistill import card, serving

pytest.importorskip("onnxruntime")

QUICK = dict(max_steps=3, per_device_train_batch_size=8, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
CLASSES = ["apple", "river", "guitar"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    texts, labels, columns = keyword_task(160, CLASSES)
    cache_path = write_toy_cache(str(root / "cache" / "toy"), texts, CLASSES, columns)
    # initializer_range 0.2: a random body whose outputs differ between texts, so predictions are not all one class.
    base = make_student_base(str(root / "base"), initializer_range=0.2)
    return root, texts, labels, cache_path, base


@pytest.fixture(scope="module")
def exported(task):
    """A calibrated student trained with --export onnx (the held-out rows give parity and calibration)."""
    root, _, _, cache_path, base = task
    output = train_student.main(
        cache=cache_path,
        output_dir=str(root / "student"),
        student_name_or_path=base,
        calibrate=True,
        holdout_fraction=0.25,
        export="onnx",
        **QUICK,
    )
    return output


def torch_and_onnx_probabilities(model_dir: str, texts: list[str], precision: str = "fp32"):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    multi_label = model.config.problem_type == "multi_label_classification"
    torch_probs, _ = serving.predict(serving.TorchClassifier(model, tokenizer), tokenizer, texts, 4, 64, multi_label)
    onnx = serving.OnnxClassifier(os.path.join(model_dir, serving.ONNX_DIR, serving.FILES[precision]), tokenizer)
    onnx_probs, _ = serving.predict(onnx, tokenizer, texts, 4, 64, multi_label)
    return model, tokenizer, torch_probs, onnx_probs


def test_export_matches_pytorch_and_loads_with_a_plain_session(exported, task):
    import onnxruntime

    _, texts, _, _, _ = task
    model, tokenizer, torch_probs, onnx_probs = torch_and_onnx_probabilities(exported, texts[:40])
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    assert torch_probs.argmax(1).min() != torch_probs.argmax(1).max()  # the comparison is not between constant outputs
    # README's three lines: the tokenizer's outputs are exactly the session's inputs.
    session = onnxruntime.InferenceSession(os.path.join(exported, "onnx", "model_quantized.onnx"))
    logits = session.run(["logits"], dict(tokenizer(texts[:3], padding=True, truncation=True, return_tensors="np")))[0]
    assert logits.shape == (3, len(CLASSES))
    _, _, _, int8_probs = torch_and_onnx_probabilities(exported, texts[:40], "int8")
    assert np.abs(int8_probs - torch_probs).max() < 0.2  # quantized, yet the same model


def test_export_is_recorded_in_distill_info_and_the_card(exported):
    info = json.load(open(os.path.join(exported, card.INFO_FILE)))
    export = info["export"]
    assert export == json.load(open(os.path.join(exported, "onnx", serving.EXPORT_FILE)))
    assert export["files"]["fp32"]["agreement"] == 1.0 and export["files"]["fp32"]["max_probability_difference"] < 1e-4
    assert export["parity_texts"] == info["metrics"]["holdout"]["examples"] == 40
    assert export["parity_source"] == "held-out texts of its cache" and export["versions"]["onnxruntime"]
    text = open(os.path.join(exported, card.CARD_FILE)).read()
    assert "## Serving with ONNX Runtime" in text and "`onnx/model_quantized.onnx` | int8" in text
    assert sorted(os.listdir(os.path.join(exported, "onnx"))) == ["export.json", "model.onnx", "model_quantized.onnx"]
    assert not [n for n in os.listdir(exported) if n.startswith(".")]  # no staging left


def test_the_calibration_temperature_survives_export(exported, task):
    _, texts, _, _, _ = task
    scale = json.load(open(os.path.join(exported, card.INFO_FILE)))["calibration"]["logit_scale"]
    assert abs(scale - 1) > 0.05  # calibration changed the head, so the test can tell the two apart
    model, tokenizer, torch_probs, onnx_probs = torch_and_onnx_probabilities(exported, texts[:20])
    features = tokenizer(texts[:20], padding=True, return_tensors="np")
    logits = serving.OnnxClassifier(os.path.join(exported, "onnx", "model.onnx"), tokenizer).session.run(
        ["logits"], dict(features)
    )[0]
    uncalibrated = serving.probabilities(logits / scale, multi_label=False)
    np.testing.assert_allclose(serving.probabilities(logits, False), torch_probs, atol=1e-4)
    assert np.abs(uncalibrated - torch_probs).max() > 1e-3


def test_a_multi_label_student_keeps_its_sigmoid_outputs(task, tmp_path):
    _, texts, _, cache_path, base = task
    student = train_student.main(
        cache=cache_path, output_dir=str(tmp_path / "multi"), student_name_or_path=base, multi_label=True, **QUICK
    )
    assert run_main("export_student.py", "--model", student).returncode == 0
    model, _, torch_probs, onnx_probs = torch_and_onnx_probabilities(student, texts[:30])
    assert model.config.problem_type == "multi_label_classification"
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    assert not np.allclose(torch_probs.sum(1), 1, atol=1e-2)  # per-class sigmoids, not a softmax
    export = json.load(open(os.path.join(student, "onnx", "export.json")))
    assert export["probabilities"] == "sigmoid" and export["parity_source"] == "held-out texts of its cache"


def test_a_failed_export_leaves_nothing_and_keeps_the_old_one(exported, monkeypatch):
    before = {
        name: os.path.getsize(os.path.join(exported, "onnx", name))
        for name in os.listdir(os.path.join(exported, "onnx"))
    }
    info_before = open(os.path.join(exported, card.INFO_FILE)).read()

    def broken(model, tokenizer, directory):
        open(os.path.join(directory, serving.FILES["fp32"]), "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serving, "export_onnx", broken)
    result = run_main("export_student.py", "--model", exported)
    assert (
        result.returncode == 2 and "cannot write the ONNX export" in result.stderr and "Traceback" not in result.stderr
    )
    assert {
        name: os.path.getsize(os.path.join(exported, "onnx", name))
        for name in os.listdir(os.path.join(exported, "onnx"))
    } == before
    assert open(os.path.join(exported, card.INFO_FILE)).read() == info_before
    assert not [n for n in os.listdir(exported) if n.startswith(".")]


def test_a_missing_runtime_is_one_line_naming_the_install(task, tmp_path, monkeypatch):
    _, _, _, cache_path, base = task
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    result = run_main(
        "train_student.py",
        "--cache",
        cache_path,
        "--output_dir",
        tmp_path / "s",
        "--student_name_or_path",
        base,
        "--export",
        "onnx",
    )
    assert result.returncode == 2 and "pip install 'zsdistill[onnx]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()  # refused before training
    result = run_main(
        "train_student.py",
        "--cache",
        cache_path,
        "--output_dir",
        tmp_path / "s",
        "--student_name_or_path",
        base,
        "--export",
        "tflite",
    )
    assert result.returncode == 2 and "--export onnx" in result.stderr


def test_evaluate_scores_the_exports_beside_pytorch(exported, task, tmp_path):
    _, texts, labels, _, _ = task
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[:48], labels[:48]))
    )
    report = evaluate.main(
        model=exported,
        test_file=str(test),
        output_dir=str(tmp_path / "report"),
        onnx=True,
        batch_one_texts=8,
        no_cuda=True,
    )
    rows = report["serving"]
    assert list(rows) == ["pytorch", "onnx_fp32", "onnx_int8"]
    assert rows["pytorch"]["accuracy"] == report["student"]["metrics"]["accuracy"]
    assert rows["onnx_fp32"]["agreement"] == 1.0 and rows["onnx_fp32"]["accuracy"] == rows["pytorch"]["accuracy"]
    for row in rows.values():
        assert row["texts_per_second"] > 0 and row["texts_per_second_batch_1"] > 0 and row["load_seconds"] >= 0
        assert row["batch_one_texts"] == 8
    assert "onnx_int8 (`onnx/model_quantized.onnx`)" in open(tmp_path / "report" / "report.md").read()


def test_evaluate_onnx_without_an_export_says_how_to_make_one(task, tmp_path):
    _, texts, labels, cache_path, base = task
    student = train_student.main(
        cache=cache_path, output_dir=str(tmp_path / "plain"), student_name_or_path=base, **QUICK
    )
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[:8], labels[:8])))
    result = run_main("evaluate.py", "--model", student, "--test_file", test, "--output_dir", tmp_path / "r", "--onnx")
    assert (
        result.returncode == 2 and "python export_student.py --model" in result.stderr and not (tmp_path / "r").exists()
    )


def test_parity_below_the_threshold_is_a_warning_in_the_log_and_the_card(task, tmp_path, monkeypatch):
    _, _, _, cache_path, base = task
    student = train_student.main(
        cache=cache_path, output_dir=str(tmp_path / "s"), student_name_or_path=base, holdout_fraction=0.25, **QUICK
    )
    monkeypatch.setitem(serving.MIN_AGREEMENT, "fp32", 1.01)  # no export can reach it
    result = run_main("export_student.py", "--model", student)
    assert result.returncode == 0
    assert "warning: fp32 ONNX agrees with the PyTorch student on 100.00% of 40 held-out texts" in result.stderr
    with open(os.path.join(student, "onnx", "export.json")) as f:
        assert len(json.load(f)["warnings"]) == 1  # int8 stays above its threshold
    with open(os.path.join(student, card.CARD_FILE)) as f:
        assert "**Warning**: fp32 ONNX agrees" in f.read()
