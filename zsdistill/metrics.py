"""Metrics on labels, shared by stage 3 (the test set) and stage 2 (a dev set): accuracy, macro-F1, per-class figures,
expected calibration error; and labels turned into the model's class indices, unknown names refused."""

import numpy as np

from zsdistill.errors import UserError

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def single_label_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    predicted = probabilities.argmax(1)
    confusion = confusion_matrix(true, predicted, labels=labels)  # rows: true class, columns: predicted class
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": float((predicted == true).mean()),
        "macro_f1": float(f1.mean()),
        "ece": expected_calibration_error(probabilities.max(1), (predicted == true).astype(float)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
    }


def multi_label_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    from sklearn.metrics import f1_score, multilabel_confusion_matrix, precision_recall_fscore_support

    predicted = probabilities > 0.5
    true = true.astype(bool)
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, zero_division=0)
    return {
        "subset_accuracy": float((predicted == true).all(1).mean()),
        "micro_f1": float(f1_score(true, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1.mean()),
        # Calibration of every per-class probability against whether the class is present.
        "ece": expected_calibration_error(
            np.where(predicted, probabilities, 1 - probabilities).ravel(), (predicted == true).astype(float).ravel()
        ),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "outcomes": multilabel_confusion_matrix(true, predicted)
        .reshape(len(class_names), 4)
        .tolist(),  # per class: tn, fp, fn, tp
    }


def accuracy_and_macro_f1(predicted: np.ndarray, true: np.ndarray, rows: np.ndarray, num_classes: int) -> tuple:
    """Accuracy (subset accuracy for multi-label 0/1 matrices) and macro-F1 over all classes of `rows` of the
    examples, as single_label_metrics and multi_label_metrics give them, without sklearn (bootstrap_intervals calls it
    a thousand times)."""
    predicted, true = predicted[rows], true[rows]
    if predicted.ndim == 2:  # multi-label
        predicted, true = predicted.astype(bool), true.astype(bool)
        accuracy = (predicted == true).all(1).mean()
        hits, predicted_count, true_count = (predicted & true).sum(0), predicted.sum(0), true.sum(0)
    else:
        right = predicted == true
        accuracy = right.mean()
        hits = np.bincount(true, weights=right, minlength=num_classes)
        predicted_count = np.bincount(predicted, minlength=num_classes)
        true_count = np.bincount(true, minlength=num_classes)
    both = predicted_count + true_count  # F1 = 2 tp / (predicted + true), 0 where a class is neither (sklearn's)
    return float(accuracy), float(np.where(both > 0, 2 * hits / np.maximum(both, 1), 0.0).mean())


def bootstrap_intervals(
    true: np.ndarray, probabilities: np.ndarray, multi_label: bool, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """95% percentile intervals of accuracy (subset accuracy for multi-label) and macro-F1 over `resamples` bootstrap
    resamples of the examples: how far another labeled set of the same size could move them. ECE has none: its
    estimate on a sample is biased upward, and its bootstrap more so."""
    predicted = probabilities > 0.5 if multi_label else probabilities.argmax(1)
    rng = np.random.default_rng(seed)
    scores = np.array(
        [
            accuracy_and_macro_f1(predicted, true, rng.integers(0, len(true), len(true)), probabilities.shape[1])
            for _ in range(resamples)
        ]
    )
    low, high = np.percentile(scores, [2.5, 97.5], axis=0)
    return {
        "resamples": resamples,
        "subset_accuracy" if multi_label else "accuracy": [float(low[0]), float(high[0])],
        "macro_f1": [float(low[1]), float(high[1])],
    }


def label_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str], multi_label: bool) -> dict:
    """single_label_metrics or multi_label_metrics, as the labels are."""
    return (multi_label_metrics if multi_label else single_label_metrics)(true, probabilities, class_names)


def encode_labels(labels: list, class_names: list[str], multi_label: bool, test_file: str) -> np.ndarray:
    """Class indices (single-label) or a 0/1 matrix (multi-label); unknown labels are an error."""
    as_lists = [label if isinstance(label, list) else [label] for label in labels]
    if not multi_label and any(len(names) != 1 for names in as_lists):
        raise UserError(
            f"{test_file}: some rows hold several labels, but the model is single-label; give one label per row"
        )
    unknown = sorted({str(name) for names in as_lists for name in names if name not in class_names})
    if unknown:
        raise UserError(
            f"{test_file}: labels not among the model's classes: {', '.join(map(repr, unknown[:10]))}"
            f"{' ...' if len(unknown) > 10 else ''}; known classes: {', '.join(map(repr, class_names))}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    if not multi_label:
        return np.array([index[names[0]] for names in as_lists])
    matrix = np.zeros((len(labels), len(class_names)), dtype=np.int64)
    for row, names in enumerate(as_lists):
        matrix[row, [index[n] for n in names]] = 1
    return matrix
