"""Stage 3: score the student (and the teacher, from its cache) against held-out labels, with speed.

    python evaluate.py --model students/topics --test_file test.jsonl --teacher_cache cache/<key> --time_teacher

Writes report.json (every number, and what was evaluated), report.md (teacher vs student side by side)
and confusion-matrix PNGs into --output_dir, and prints the table.
"""

import dataclasses
import json
import os
import sys
import time

import numpy as np

from zsdistill import cache, cache_report, card, data, inference, models, refine, serving, targets
from zsdistill.errors import UserError, run_cli, writing_to
from zsdistill.metrics import (  # noqa: F401 (evaluate.ECE_BINS and the metrics are this stage's public names)
    ECE_BINS,
    bootstrap_intervals,
    encode_labels,
    expected_calibration_error,
    label_metrics,
    multi_label_metrics,
    single_label_metrics,
)
from zsdistill.options import cli, option


def log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def agreement(a: np.ndarray, b: np.ndarray, multi_label: bool) -> float:
    if multi_label:
        return float(((a > 0.5) == (b > 0.5)).mean())
    return float((a.argmax(1) == b.argmax(1)).mean())


# ---------------------------------------------------------------- pieces of the story


def load_student(model_dir: str, device):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UserError(
            f"--model {model_dir!r} is not a model directory (no config.json); pass the --output_dir of "
            f"train_student.py"
        )
    config = AutoConfig.from_pretrained(model_dir)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise UserError(
            f"--model {model_dir!r} is not a sequence classifier (architectures: {config.architectures}); pass a "
            f"student trained by train_student.py"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model_dir!r}: cannot load it ({str(e).splitlines()[0]})") from None
    return model, tokenizer


def compare_runtimes(
    model_dir: str,
    tokenizer,
    texts: list[str],
    true: np.ndarray,
    batch_size: int,
    batch_one_texts: int,
    max_length: int,
    multi_label: bool,
    class_names: list[str],
    device,
) -> dict:
    """The PyTorch student and its ONNX exports, each loaded and served on its own: metrics, agreement with the
    PyTorch student, texts/s at batch 1 and at batch_size, load time and peak memory."""
    loaders = {"pytorch": (None, lambda: serving.TorchClassifier(*load_student(model_dir, device)))}
    for precision, name in serving.FILES.items():
        path = os.path.join(model_dir, serving.ONNX_DIR, name)
        loaders[f"onnx_{precision}"] = (
            f"{serving.ONNX_DIR}/{name}",
            lambda path=path: serving.OnnxClassifier(path, tokenizer),
        )
    rows, reference = {}, None
    for runtime, (file, load) in loaders.items():
        log(
            f"serving: {runtime} on {len(texts)} examples at batch {batch_size}, {min(batch_one_texts, len(texts))} "
            f"at batch 1"
        )
        probabilities, speed = serving.measure_serving(
            load, tokenizer, texts, batch_size, batch_one_texts, max_length, multi_label
        )
        reference = probabilities if reference is None else reference
        metrics = label_metrics(true, probabilities, class_names, multi_label)
        rows[runtime] = {
            "file": file,
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
            **serving.parity(reference, probabilities, multi_label),
            **speed,
        }
    return rows


def time_live_teacher(name_or_path: str, manifest: dict, texts: list[str], device) -> dict:
    """Examples/second of the live zero-shot teacher on a sample, through stage 1's code path and batch defaults."""
    from zsdistill import teacher as zs_teacher  # only here: the rest of stage 3 never loads a teacher

    teacher = zs_teacher.resolve_teacher(name_or_path, kind=manifest["teacher"]["kind"])
    model, tokenizer = zs_teacher.load_model(teacher, device)
    max_length = models.resolve_max_length(tokenizer, model, manifest.get("max_length"))
    hypotheses = manifest["hypotheses"]
    batch_size, max_tokens = inference.default_batches(device)

    def run(sample):
        if teacher.kind == "nli":
            encoder = inference.PairEncoder(tokenizer, max_length)
            return inference.nli_logits(
                model, encoder, encoder.tokenize(sample), encoder.tokenize(hypotheses), batch_size, max_tokens
            )
        embeddings = inference.embed(model, tokenizer, sample, max_length, batch_size, max_tokens, teacher.pooling)
        return (
            embeddings
            @ inference.embed(model, tokenizer, hypotheses, max_length, batch_size, max_tokens, teacher.pooling).T
        )

    run(texts[: min(4, len(texts))])  # warm-up
    started = time.perf_counter()
    run(texts)
    elapsed = time.perf_counter() - started
    return {
        "teacher": name_or_path,
        "examples": len(texts),
        "examples_per_second": len(texts) / elapsed,
        "forward_passes_per_example": len(hypotheses) if teacher.kind == "nli" else 1,
    }


def dev_in_refinement(report: dict) -> bool:
    info = report["student"].get("distill_info") or {}
    return bool((info.get("refinement") or {}).get("labeled_texts"))


def refined_teacher(model_dir: str, cache_path: str, manifest: dict) -> tuple[np.ndarray, str] | str | None:
    """The teacher's predictions after the student's refinement, applied to the test cache: what the
    student was taught. None if the student was trained without refinement; a reason (str) if it cannot be shown."""
    info_path, refinement_path = os.path.join(model_dir, "distill_info.json"), os.path.join(model_dir, refine.FILE)
    if not os.path.exists(info_path):
        return None
    with open(info_path) as f:
        settings = json.load(f).get("refinement") or {}
    if not settings.get("method"):
        return None
    if not os.path.exists(refinement_path):
        return f"{refinement_path} is missing"
    if refine.embedding_fingerprint(manifest) != settings.get("embedding_fingerprint"):
        return "the teacher cache holds no text embeddings from the model the refinement was fitted with"
    refinement = refine.load(refinement_path)
    return refinement.posteriors(refine.embedding_chunks(cache_path, manifest), manifest["num_examples"]), settings[
        "method"
    ]


def confusion_png(
    path: str, confusion: list[list[int]], class_names: list[str], title: str, columns: list[str] | None = None
) -> None:
    """A confusion matrix (true x predicted), or per-class outcome counts (class x tn/fp/fn/tp) for multi-label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(confusion)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(matrix.shape[1]), columns or class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("outcome" if columns else "predicted")
    ax.set_ylabel("class" if columns else "true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reliability_png(
    path: str, probabilities: dict[str, np.ndarray], true: np.ndarray, multi_label: bool, bins: int = ECE_BINS
) -> None:
    """Reliability diagrams side by side: per confidence bin, accuracy against mean confidence (the diagonal is
    perfect calibration), with each bin's share of examples as bars. Multi-label: every per-class probability
    against whether the class is present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probabilities), figsize=(4.2 * len(probabilities), 4.4), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (who, p) in zip(axes[0], probabilities.items()):
        if multi_label:
            predicted = p > 0.5
            confidence = np.where(predicted, p, 1 - p).ravel()
            correct = (predicted == true.astype(bool)).ravel()
        else:
            confidence, correct = p.max(1), p.argmax(1) == true
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        filled = counts > 0
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins)[filled] / counts[filled]
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins)[filled] / counts[filled]
        ax.bar(
            edges[:-1],
            counts / counts.sum(),
            width=1 / bins,
            align="edge",
            color="lightgray",
            edgecolor="white",
            label="share of examples",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        ax.plot(mean_confidence, accuracy, "o-", color="tab:blue", label="accuracy in bin")
        ece = float((counts[filled] / counts.sum() * np.abs(accuracy - mean_confidence)).sum())
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{who} (ECE {ece:.3f})")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(report: dict) -> str:
    multi = report["multi_label"]
    rows = [("subset accuracy", "subset_accuracy"), ("micro-F1", "micro_f1")] if multi else [("accuracy", "accuracy")]
    rows += [("macro-F1", "macro_f1"), ("ECE", "ece")]
    teacher = report.get("teacher")
    refined = report.get("refined_teacher", {}).get("metrics")
    lines = [
        f"# Evaluation: {report['model']}",
        "",
        f"Test set: `{report['test_file']}` ({report['num_examples']} examples, {len(report['class_names'])} classes, "
        f"{'multi' if multi else 'single'}-label). Hardware: {report['hardware']}.",
        "",
        "| metric | teacher | refined teacher | student |" if refined else "| metric | teacher | student |",
        "| --- | --- | --- | --- |" if refined else "| --- | --- | --- |",
    ]

    def row(title: str, *values) -> str:
        cells = [v if isinstance(v, str) else f"{v:.4f}" if title != "examples/second" else f"{v:.1f}" for v in values]
        return f"| {title} | " + " | ".join(cells) + " |"

    for title, key in rows:
        teacher_value = teacher["metrics"][key] if teacher else "-"
        lines.append(
            row(title, teacher_value, refined[key], report["student"]["metrics"][key])
            if refined
            else row(title, teacher_value, report["student"]["metrics"][key])
        )
    speed = report.get("speed", {})
    teacher_speed = speed.get("teacher_examples_per_second") or "-"
    lines.append(
        row("examples/second", teacher_speed, "-", speed["student_examples_per_second"])
        if refined
        else row("examples/second", teacher_speed, speed["student_examples_per_second"])
    )
    if "interval_95" in report["student"]["metrics"]:  # reports of releases before it have none
        lines += ["", interval_text(report)]
    if refined:
        lines += [
            "",
            f"Refined teacher: the teacher's scores after the student's "
            f"{'refinement (with its dev labels)' if dev_in_refinement(report) else 'label-free refinement'} "
            f"({report['refined_teacher']['method']}, fitted on the training cache, applied to the test cache): what "
            f"the student was taught.",
        ]
    elif report.get("refined_teacher", {}).get("note"):
        lines += ["", f"Refined teacher not shown: {report['refined_teacher']['note']}."]
    if teacher:
        lines += ["", f"Student-teacher agreement on the test set: {report['agreement']:.4f}."]
    info = report["student"].get("distill_info")
    if info:
        lines.append(f"Student confidence: {card.calibration_text(info)}.")
    if speed.get("speedup"):
        lines.append(f"Student speedup over the live zero-shot teacher: {speed['speedup']:.1f}x.")
    if report.get("serving"):
        lines += ["", *serving_table(report["serving"], multi)]
    lines += [
        "",
        "Plots: [reliability diagram](reliability.png), [student confusion matrix](confusion_student.png)"
        + (", [teacher confusion matrix](confusion_teacher.png)" if teacher else "")
        + ".",
    ]
    lines += [
        "",
        "## Per class (student)",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in report["student"]["metrics"]["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    return "\n".join(lines) + "\n"


def interval_text(report: dict) -> str:
    """One sentence: each model's 95% bootstrap intervals of accuracy and macro-F1 on this test set."""
    models_metrics = [("teacher", report.get("teacher", {}).get("metrics"))]
    models_metrics += [("refined teacher", report.get("refined_teacher", {}).get("metrics"))]
    models_metrics += [("student", report["student"]["metrics"])]
    found = [(name, m["interval_95"]) for name, m in models_metrics if m and "interval_95" in m]
    keys = [("subset accuracy", "subset_accuracy")] if report["multi_label"] else [("accuracy", "accuracy")]
    parts = [
        f"{title}: " + ", ".join(f"{name} {i[key][0]:.3f}-{i[key][1]:.3f}" for name, i in found)
        for title, key in keys + [("macro-F1", "macro_f1")]
    ]
    return (
        f"95% intervals over {found[-1][1]['resamples']:,} bootstrap resamples of the {report['num_examples']} test "
        f"texts (how far another test set of this size could move them): {'; '.join(parts)}."
    )


def serving_table(runtimes: dict, multi_label: bool) -> list[str]:
    first = "subset_accuracy" if multi_label else "accuracy"
    batch = next(iter(runtimes.values()))["batch_size"]
    lines = [
        f"| runtime | {first.replace('_', ' ')} | macro-F1 | ECE | agreement with PyTorch | texts/s batch 1 | texts/s "
        f"batch {batch} "
        f"| load (s) | peak memory (MB) |",
        "| --- " * 9 + "|",
    ]
    for runtime, r in runtimes.items():
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        name = f"{runtime} (`{r['file']}`)" if r["file"] else runtime
        lines.append(
            f"| {name} | {r[first]:.4f} | {r['macro_f1']:.4f} | {r['ece']:.4f} "
            f"| {r['agreement']:.4f} | {r['texts_per_second_batch_1']:.1f} | {r['texts_per_second']:.1f} | "
            f"{r['load_seconds']:.2f} | {memory} |"
        )
    return lines


# ---------------------------------------------------------------- the stage


def writing_report(output_dir: str):
    return writing_to(output_dir, "the report", "free space there, or pass another --output_dir")


def write_report_files(output_dir: str, markdown: str, report: dict) -> None:
    """report.md, then report.json, each written atomically."""
    for name, text in (("report.md", markdown), ("report.json", json.dumps(report, indent=2) + "\n")):
        with cache.atomic_file(os.path.join(output_dir, name)) as f:
            f.write(text)


def inspect_cache(teacher_cache: str, output_dir: str) -> dict:
    """The label-free report of a cache alone: what the teacher sees, before any training (`make inspect`)."""
    manifest, _ = cache.load_cache(str(teacher_cache))
    log(
        f"label-free report of {teacher_cache} ({manifest['num_examples']} texts, {len(manifest['class_names'])} "
        f"classes)"
    )
    report = cache_report.build(str(teacher_cache), manifest, log)
    with writing_report(str(output_dir)):
        cache_report.write_plots(str(output_dir), report)
        markdown = cache_report.markdown(report)
        write_report_files(str(output_dir), markdown, {"cache_report": report})
    print(cache_report.head(markdown, os.path.join(str(output_dir), "report.md")))
    log(f"wrote {os.path.join(str(output_dir), 'report.md')} ({len(report['warnings'])} warnings) and its plots")
    return {"cache_report": report}


def teacher_against_labels(
    teacher_cache: str, test_file: str, output_dir: str, text_column: str, label_column: str
) -> dict:
    """The teacher alone on a labeled set (before any student): its single-label metrics from the cache of the labeled
    texts, and the label-free report with each warning checked against the labels (e.g. on a small dev set, to
    compare class names or templates)."""
    texts, labels = data.read_labeled(test_file, text_column, label_column)
    manifest, table = cache.load_cache(teacher_cache)
    if table.column("text").to_pylist() != texts:
        raise UserError(
            f"--teacher_cache {teacher_cache} was not made from the texts of {test_file} (in the same order); run "
            f"teacher_infer.py on the test file (--data_file {test_file} --text_column {text_column})"
        )
    class_names = manifest["class_names"]
    true = encode_labels(labels, class_names, False, test_file)
    probabilities = targets.cache_probabilities(teacher_cache, manifest, False)
    report = {
        "teacher_cache": os.path.abspath(teacher_cache),
        "test_file": os.path.abspath(test_file),
        "num_examples": len(texts),
        "class_names": class_names,
        "teacher": {
            "name_or_path": manifest["teacher"]["name_or_path"],
            "metrics": single_label_metrics(true, probabilities, class_names),
        },
        "cache_report": cache_report.build(teacher_cache, manifest, log),
    }
    cache_report.confirm_with_labels(report["cache_report"], true, probabilities)
    metrics = report["teacher"]["metrics"]
    lines = [
        f"# Teacher against labels: {manifest['teacher']['name_or_path']}",
        "",
        f"Test set: `{test_file}` ({len(texts)} examples, {len(class_names)} classes); template "
        f"`{manifest['hypothesis_template']}`.",
        "",
        f"Accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, ECE {metrics['ece']:.4f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in metrics["per_class"].items()
    ]
    look = cache_report.markdown(report["cache_report"], heading="##")
    with writing_report(output_dir):
        confusion_png(
            os.path.join(output_dir, "confusion_teacher.png"), metrics["confusion_matrix"], class_names, "teacher"
        )
        cache_report.write_plots(output_dir, report["cache_report"])
        write_report_files(output_dir, "\n".join(lines) + "\n\n" + look, report)
    print("\n".join(lines[:5]) + "\n\n" + cache_report.head(look, os.path.join(output_dir, "report.md")))
    return report


@dataclasses.dataclass
class EvaluateOptions:
    """evaluate.py's flags, checked once: which report (a student's, the teacher's against labels, or the label-free
    look at a cache) follows from which of --model, --test_file and --teacher_cache are given."""

    model: str | None = option(
        None,
        "a student directory written by train_student.py (with --test_file). Without it: the teacher alone "
        "(--teacher_cache: its label-free report; with --test_file, its metrics and that report checked against the "
        "labels).",
    )
    test_file: str | None = option(
        None, "labeled data: .jsonl/.csv/.parquet with text and label columns, or .tsv/.txt lines 'label<TAB>text'."
    )
    teacher_cache: str | None = option(
        None,
        "a cache made by teacher_infer.py: alone, its label-free report; with --model and --test_file (the cache of "
        "the test texts), the teacher's metrics and the label-free report, its warnings checked against the labels.",
    )
    output_dir: str = option("reports/report", "where report.json, report.md and the confusion-matrix PNGs go.")
    batch_size: int = option(64, "student inference batch size.")
    text_column: str = option("text", "text column of tabular test files.")
    label_column: str = option(
        "label", "label column of tabular test files (a class name, or a list of names for multi-label)."
    )
    time_teacher: bool | str = option(
        False, "also time the live zero-shot teacher on a sample (True: the cache's teacher; or a model path)."
    )
    time_teacher_samples: int = option(32, "how many test texts the live teacher is timed on.")
    onnx: bool = option(
        False,
        "also score the student's ONNX exports (onnx/model.onnx and onnx/model_quantized.onnx, written by "
        "train_student.py --export onnx or export_student.py) beside the PyTorch student: metrics, agreement with "
        "it, texts/s at batch 1 and at --batch_size, load time and peak memory, each runtime loaded on its own.",
    )
    batch_one_texts: int = option(256, "with --onnx, how many test texts each runtime is timed on at batch 1.")
    no_cuda: bool = option(False, "run on the CPU even when a GPU is present.")

    def __post_init__(self):
        self.output_dir = str(self.output_dir)
        self.model, self.test_file, self.teacher_cache = (
            None if v is None else str(v) for v in (self.model, self.test_file, self.teacher_cache)
        )
        if self.model is None and self.test_file is None:
            if not self.teacher_cache:
                raise UserError(
                    "give --teacher_cache CACHE for the label-free report of a cache, or --model and --test_file (and "
                    "--teacher_cache) to evaluate a student"
                )
            if self.time_teacher:
                raise UserError(
                    "--time_teacher times the teacher against the student: give --model and --test_file too"
                )
        elif self.test_file is None or (self.model is None and not self.teacher_cache):
            raise UserError(
                f"--{'model' if self.model is None else 'test_file'} is missing: a student's report needs both --model "
                f"and --test_file; the teacher alone needs --teacher_cache (with --test_file, against its labels)"
            )
        if self.model is not None and self.time_teacher and not self.teacher_cache:
            raise UserError("--time_teacher needs --teacher_cache: the cache names the teacher and its hypotheses")
        self.batch_one_texts = int(self.batch_one_texts)

    @property
    def mode(self) -> str:
        """`inspect` (a cache, no labels), `teacher` (a cache against labels) or `student`."""
        return "student" if self.model else "teacher" if self.test_file else "inspect"


def labeled_inputs(options: EvaluateOptions):
    """The test texts, the student (loaded), its classes and the labels in its class order; cheap checks first."""
    texts, labels = data.read_labeled(options.test_file, options.text_column, options.label_column)
    device = models.select_device(options.no_cuda)
    student, tokenizer = load_student(options.model, device)
    class_names = [student.config.id2label[i] for i in range(student.config.num_labels)]
    multi_label = student.config.problem_type == "multi_label_classification"
    true = encode_labels(labels, class_names, multi_label, options.test_file)
    return texts, true, student, tokenizer, class_names, multi_label, device


def test_cache(options: EvaluateOptions, texts: list[str], class_names: list[str]) -> tuple[dict | None, object]:
    """The cache of the test texts (checked to be theirs, with the student's classes), or (None, None)."""
    if not options.teacher_cache:
        return None, None
    manifest, table = cache.load_cache(options.teacher_cache)
    if table.column("text").to_pylist() != texts:
        raise UserError(
            f"--teacher_cache {options.teacher_cache} was not made from the texts of {options.test_file} (in the same "
            f"order); run teacher_infer.py on the test file (--data_file {options.test_file} --text_column "
            f"{options.text_column})"
        )
    if sorted(manifest["class_names"]) != sorted(class_names):
        raise UserError(
            f"--teacher_cache has classes {manifest['class_names']}, the model has {class_names}; use a cache "
            f"made with the model's class names"
        )
    return manifest, table


def check_onnx_files(options: EvaluateOptions) -> None:
    if not options.onnx:
        return
    serving.require_runtime(export=False)
    paths = [os.path.join(options.model, serving.ONNX_DIR, name) for name in serving.FILES.values()]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise UserError(
            f"--onnx: {missing[0]} is missing; export the student first: python export_student.py --model "
            f"{options.model}"
        )


def metrics_with_intervals(true: np.ndarray, probabilities: np.ndarray, class_names: list[str], multi_label: bool):
    """label_metrics plus `interval_95`: accuracy's and macro-F1's 95% bootstrap intervals on this test set."""
    intervals = bootstrap_intervals(true, probabilities, multi_label)
    return {**label_metrics(true, probabilities, class_names, multi_label), "interval_95": intervals}


def student_report(options: EvaluateOptions, student, tokenizer, texts, true, class_names, multi_label, device):
    """The report's student part (metrics, speed, and with --onnx the exported runtimes), and its probabilities."""
    log(f"student {options.model} on {len(texts)} examples ({device})")
    max_length = models.resolve_max_length(tokenizer, student, None)
    torch_student = serving.TorchClassifier(student, tokenizer)
    probabilities, speed = serving.predict(torch_student, tokenizer, texts, options.batch_size, max_length, multi_label)
    report = {
        "model": os.path.abspath(options.model),
        "test_file": os.path.abspath(options.test_file),
        "test_file_sha256": data.file_sha256(options.test_file),
        "num_examples": len(texts),
        "class_names": class_names,
        "multi_label": multi_label,
        "hardware": models.hardware_name(device),
        "student": {"metrics": metrics_with_intervals(true, probabilities, class_names, multi_label)},
        "speed": {"student_examples_per_second": speed, "student_batch_size": options.batch_size},
    }
    if options.onnx:
        report["serving"] = compare_runtimes(
            options.model,
            tokenizer,
            texts,
            true,
            options.batch_size,
            options.batch_one_texts,
            max_length,
            multi_label,
            class_names,
            device,
        )
    distill_info = os.path.join(options.model, card.INFO_FILE)
    if os.path.exists(distill_info):
        with open(distill_info) as f:
            info = json.load(f)
        kept = ("cache_key", "teacher", "student_base", "temperature", "multi_label", "refinement", "calibration")
        report["student"]["distill_info"] = {k: v for k, v in info.items() if k in kept}
    return report, probabilities


def teacher_report(report: dict, options: EvaluateOptions, manifest: dict, table, true, student_probabilities):
    """Adds the teacher (rebuilt from its cache with stage 2's target math, T=1), the refined teacher and the
    label-free report checked against the labels; returns the teacher's probabilities."""
    class_names, multi_label = report["class_names"], report["multi_label"]
    order = [manifest["class_names"].index(name) for name in class_names]
    columns = {name: values[:, order] for name, values in cache.score_arrays(manifest, table).items()}
    teacher_probabilities = targets.teacher_probabilities(columns, multi_label, temperature=1.0)
    report["teacher"] = {
        "cache": os.path.abspath(options.teacher_cache),
        "cache_key": manifest["key"],
        "name_or_path": manifest["teacher"]["name_or_path"],
        "metrics": metrics_with_intervals(true, teacher_probabilities, class_names, multi_label),
    }
    report["agreement"] = agreement(student_probabilities, teacher_probabilities, multi_label)
    refined = refined_teacher(options.model, options.teacher_cache, manifest)
    if isinstance(refined, str):
        report["refined_teacher"] = {"note": refined}
        log(f"refined teacher: {refined}")
    elif refined is not None:
        report["refined_teacher"] = {
            "method": refined[1],
            "metrics": metrics_with_intervals(true, refined[0], class_names, multi_label),
        }
    report["cache_report"] = cache_report.build(options.teacher_cache, manifest, log)
    if not multi_label:
        # The report counts classes in the cache's order: the labels and the teacher's columns moved into it.
        columns = np.array([class_names.index(name) for name in manifest["class_names"]])  # cache's class i's column
        cache_report.confirm_with_labels(
            report["cache_report"], np.argsort(columns)[true], teacher_probabilities[:, columns]
        )
    return teacher_probabilities


def teacher_speed(report: dict, options: EvaluateOptions, manifest: dict, texts: list[str], device) -> None:
    name = options.time_teacher if isinstance(options.time_teacher, str) else manifest["teacher"]["name_or_path"]
    sample = texts[: max(1, int(options.time_teacher_samples))]
    log(f"timing the live teacher {name} on {len(sample)} examples")
    timing = time_live_teacher(name, manifest, sample, device)
    report["speed"].update(
        teacher_examples_per_second=timing["examples_per_second"],
        teacher_timed_examples=timing["examples"],
        speedup=report["speed"]["student_examples_per_second"] / timing["examples_per_second"],
    )


def evaluate(options: EvaluateOptions) -> dict:
    """Evaluate a student (and its teacher, from a cache) on labeled data, with speed; or, with only --teacher_cache,
    report what the teacher sees in a cache without any label (look before you train)."""
    if options.mode == "inspect":
        return inspect_cache(options.teacher_cache, options.output_dir)
    if options.mode == "teacher":
        return teacher_against_labels(
            options.teacher_cache, options.test_file, options.output_dir, options.text_column, options.label_column
        )

    # 1. Cheap validation first: test file, model config, labels, cache, exported files.
    texts, true, student, tokenizer, class_names, multi_label, device = labeled_inputs(options)
    manifest, table = test_cache(options, texts, class_names)
    check_onnx_files(options)

    # 2. The student on every test text, timed (and with --onnx, its exports beside it).
    report, student_probabilities = student_report(
        options, student, tokenizer, texts, true, class_names, multi_label, device
    )

    # 3. The teacher, from its cache, and the refined teacher; the live teacher timed when asked.
    teacher_probabilities = None
    if manifest is not None:
        teacher_probabilities = teacher_report(report, options, manifest, table, true, student_probabilities)
    if options.time_teacher:
        teacher_speed(report, options, manifest, texts, device)

    # 4. Write the report (each file atomically; report.json last) and print the table.
    with writing_report(options.output_dir):
        write_labeled_report(
            report,
            options.output_dir,
            options.model,
            options.test_file,
            multi_label,
            true,
            student_probabilities,
            teacher_probabilities,
        )
    return report


main = cli(
    EvaluateOptions,
    evaluate,
    "Evaluate a student (and its teacher, from a cache) on labeled data, with speed; or, with only --teacher_cache, "
    "report what the teacher sees in a cache without any label (look before you train).",
)


def write_labeled_report(
    report: dict,
    output_dir: str,
    model: str,
    test_file: str,
    multi_label: bool,
    true: np.ndarray,
    student_probabilities: np.ndarray,
    teacher_probabilities: np.ndarray | None,
) -> None:
    class_names = report["class_names"]
    for who in ("student", "teacher"):
        if who in report:
            metrics = report[who]["metrics"]
            matrix, columns = (
                (metrics["outcomes"], ["tn", "fp", "fn", "tp"]) if multi_label else (metrics["confusion_matrix"], None)
            )
            confusion_png(os.path.join(str(output_dir), f"confusion_{who}.png"), matrix, class_names, who, columns)
    probabilities = {"teacher": teacher_probabilities} if teacher_probabilities is not None else {}
    reliability_png(
        os.path.join(str(output_dir), "reliability.png"),
        {**probabilities, "student": student_probabilities},
        true,
        multi_label,
    )
    if card.add_evaluation(
        str(model),
        os.path.basename(str(test_file)),
        report["student"]["metrics"],
        multi_label,
        report.get("refined_teacher", {}).get("metrics"),
        report.get("teacher", {}).get("metrics"),
    ):
        log(f"added the results to the model card {os.path.join(str(model), card.CARD_FILE)}")
    markdown = shown = markdown_report(report)
    if "cache_report" in report:
        cache_report.write_plots(output_dir, report["cache_report"])
        look = cache_report.markdown(report["cache_report"], heading="##")
        markdown += "\n" + look
        shown += "\n" + cache_report.head(look, os.path.join(output_dir, "report.md"))
    write_report_files(output_dir, markdown, report)
    print(shown)


if __name__ == "__main__":
    run_cli(main)
