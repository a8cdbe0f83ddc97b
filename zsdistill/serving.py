"""The student served without PyTorch: ONNX export (fp32 and dynamic int8), parity checks, and how fast each runs.

In a student directory, `train_student.py --export onnx` or `export_student.py` write (optimum's file names):

    onnx/model.onnx            fp32; inputs are the tokenizer's outputs (int64, [batch, sequence]); output `logits`
    onnx/model_quantized.onnx  int8 weights, activations quantized at run time (onnxruntime's dynamic quantization)
    onnx/export.json           what was exported, with which versions, and the parity figures measured at export

The logits are the PyTorch student's, calibration included (its temperature is folded into the head's weights):
softmax (single-label) or sigmoid (multi-label) of them gives the student's calibrated probabilities.
"""

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import torch

from zsdistill import card, inference, models
from zsdistill.cache import _umask, write_json_atomic
from zsdistill.errors import UserError
from zsdistill.refine import softmax_rows

ONNX_DIR = "onnx"
FILES = {"fp32": "model.onnx", "int8": "model_quantized.onnx"}
EXPORT_FILE = "export.json"
INSTALL = "pip install 'zsdistill[onnx]'"
OPSET = 18
# Parity below these is a warning. fp32 differs from PyTorch only by the order of float operations, so any
# disagreement beyond rounding (1 in 1000) means a broken export. int8 moves probabilities by a few points; 98%
# top-1 agreement keeps accuracy within about a point (demo student: 99.1% agreement, accuracy 0.826 vs 0.824).
MIN_AGREEMENT = {"fp32": 0.999, "int8": 0.98}
MAX_PARITY_TEXTS = 2000  # agreement to about +-0.3% at 98%; more only cost export time


def parity_texts(table, rows: np.ndarray) -> list[str]:
    """The texts of a cache table's `rows` that an export is checked on (the first MAX_PARITY_TEXTS)."""
    return table.column("text").take(rows[:MAX_PARITY_TEXTS]).to_pylist()


def require_runtime(export: bool = True) -> None:
    """One clear line, naming the install command, when the ONNX packages are missing."""
    modules = ["onnxruntime", "onnx", "onnxscript"] if export else ["onnxruntime"]
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            raise UserError(
                f"{'ONNX export' if export else 'serving with ONNX Runtime'} needs the package {name!r}, "
                f"which is not installed: {INSTALL}"
            ) from None


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """What the student's head gives: a sigmoid per class (multi-label) or a softmax over the classes."""
    logits = logits.astype(np.float64)  # a copy: softmax_rows works in place
    return (1 / (1 + np.exp(-logits)) if multi_label else softmax_rows(logits)).astype(np.float32)


def parity(reference: np.ndarray, other: np.ndarray, multi_label: bool) -> dict:
    """Top-1 agreement (multi-label: agreement of every per-class decision) and the largest probability difference."""
    if multi_label:
        agreement = float(((reference > 0.5) == (other > 0.5)).mean())
    else:
        agreement = float((reference.argmax(1) == other.argmax(1)).mean())
    return {"agreement": agreement, "max_probability_difference": float(np.abs(reference - other).max())}


# ---------------------------------------------------------------- runtimes: each turns token ids into logits


class TorchClassifier:
    """The PyTorch student, as a function from a batch of token ids to logits."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device

    def __call__(self, features: dict[str, list]) -> np.ndarray:
        features = self.tokenizer.pad(features, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in features.items()}).logits
        return logits.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class OnnxClassifier:
    """An exported student in an onnxruntime.InferenceSession, fed what the tokenizer returns."""

    def __init__(self, path: str, tokenizer):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
        self.tokenizer = tokenizer
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, features: dict[str, list]) -> np.ndarray:
        features = self.tokenizer.pad(features, return_tensors="np")
        return self.session.run(["logits"], {name: features[name].astype(np.int64) for name in self.input_names})[0]

    def synchronize(self) -> None:
        pass


def predict(
    classifier: Callable, tokenizer, texts: list[str], batch_size: int, max_length: int, multi_label: bool
) -> tuple[np.ndarray, float]:
    """Class probabilities and texts/second (tokenization included), length-sorted batches, one warm-up batch
    untimed."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    batches = inference.length_sorted_batches(lengths, batch_size, batch_size * max_length)

    def features(batch: np.ndarray) -> dict[str, list]:
        return {name: [values[i] for i in batch.tolist()] for name, values in encoded.items()}

    out = np.empty((len(texts), 0), dtype=np.float32)
    classifier(features(batches[0]))  # warm-up
    classifier.synchronize()
    started = time.perf_counter()
    for batch in batches:
        logits = classifier(features(batch))
        if out.shape[1] == 0:
            out = np.empty((len(texts), logits.shape[1]), dtype=np.float32)
        out[batch] = probabilities(logits, multi_label)
    classifier.synchronize()
    return out, len(texts) / (time.perf_counter() - started)


def student_logits(model_dir: str, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """The PyTorch student's logits (N, K) on the CPU, calibration included, texts cut at its training max_length, in
    length-sorted batches (what the benchmarks read a trained student with)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    classifier = TorchClassifier(AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), tokenizer)
    with open(os.path.join(model_dir, card.INFO_FILE)) as f:
        max_length = json.load(f)["max_length"]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    out = None
    for batch in inference.length_sorted_batches(lengths, batch_size, batch_size * max_length):
        logits = classifier({name: [values[i] for i in batch.tolist()] for name, values in encoded.items()})
        out = np.empty((len(texts), logits.shape[1]), dtype=np.float32) if out is None else out
        out[batch] = logits
    return out


# ---------------------------------------------------------------- export


class _Logits(torch.nn.Module):
    """torch.onnx.export wants a module whose forward takes tensors and returns one: the student's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def export_onnx(model, tokenizer, directory: str) -> dict[str, str]:
    """Write the fp32 and int8 ONNX files of `model` into `directory`; returns their paths by precision."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]
    # Two texts of different lengths, so neither the batch nor the sequence dimension is specialised to 1.
    sample = tokenizer(["an example", "a longer example of a text to classify"], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    paths = {precision: os.path.join(directory, name) for precision, name in FILES.items()}
    with _quiet():
        torch.onnx.export(
            _Logits(model.float().cpu().eval()).eval(),
            (),
            paths["fp32"],
            kwargs={n: sample[n] for n in names},
            input_names=names,
            output_names=["logits"],
            dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        # Per-channel weights with 7-bit range: on CPUs without VNNI (AVX2) 8-bit products can saturate; the demo
        # student's agreement with PyTorch: 0.970 per tensor, 0.991 per channel with the reduced range.
        quantize_dynamic(paths["fp32"], paths["int8"], weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    return paths


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and warnings about its own internals, the quantizer a pre-processing hint on
    the root logger: none of them is something the user can act on."""
    import io
    import warnings

    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_student(model_dir: str, parity_texts: list[str], parity_source: str, log: Callable[[str], None]) -> dict:
    """Export the student in `model_dir` to `model_dir/onnx/` (staged, then moved in whole; an old export is
    replaced only once the new one is complete), with parity against PyTorch on `parity_texts`."""
    require_runtime(export=True)
    import onnx
    import onnxruntime
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    multi_label = model.config.problem_type == "multi_label_classification"
    max_length = models.resolve_max_length(tokenizer, model, None)
    texts = parity_texts[:MAX_PARITY_TEXTS]
    if not texts:
        raise UserError(f"no texts to check the export of {model_dir} on; give the student's cache or a --parity_file")
    staging = tempfile.mkdtemp(prefix=".onnx-staging-", dir=model_dir)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the published onnx/ reads like its parent
        started = time.time()
        log(f"exporting {model_dir} to ONNX (fp32, then int8 weights)")
        paths = export_onnx(model, tokenizer, staging)
        export_seconds = time.time() - started
        reference, _ = predict(TorchClassifier(model, tokenizer), tokenizer, texts, 32, max_length, multi_label)
        files, warnings = {}, []
        for precision, path in paths.items():
            session = OnnxClassifier(path, tokenizer)
            if sorted(session.input_names) != sorted(tokenizer.model_input_names):
                raise RuntimeError(
                    f"the exported inputs {session.input_names} are not the tokenizer's {tokenizer.model_input_names}"
                )
            measured = parity(
                reference, predict(session, tokenizer, texts, 32, max_length, multi_label)[0], multi_label
            )
            files[precision] = {
                "file": f"{ONNX_DIR}/{FILES[precision]}",
                "size_mb": round(os.path.getsize(path) / 2**20, 1),
                **measured,
                "min_agreement": MIN_AGREEMENT[precision],
            }
            if measured["agreement"] < MIN_AGREEMENT[precision]:
                warnings.append(
                    f"{precision} ONNX agrees with the PyTorch student on {measured['agreement']:.2%} of "
                    f"{len(texts)} {parity_source}, below {MIN_AGREEMENT[precision]:.1%}: check its accuracy before "
                    f"serving it"
                )
            log(
                f"{precision}: {files[precision]['file']} ({files[precision]['size_mb']} MB), agreement with PyTorch "
                f"{measured['agreement']:.4f}, largest probability difference "
                f"{measured['max_probability_difference']:.4f}"
            )
        for warning in warnings:
            log(f"warning: {warning}")
        info = {
            "format": "onnx",
            "files": files,
            "outputs": "logits",
            "probabilities": "sigmoid" if multi_label else "softmax",
            "calibration": "folded into the head's weights: the exported logits are the calibrated ones",
            "inputs": list(session.input_names),
            "quantization": "dynamic, int8 weights per channel (reduced range), activations quantized at run time",
            "parity_texts": len(texts),
            "parity_source": parity_source,
            "warnings": warnings,
            "export_seconds": round(export_seconds, 1),
            "versions": {
                "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__,
                "torch": torch.__version__,
                "opset": OPSET,
            },
        }
        write_json_atomic(os.path.join(staging, EXPORT_FILE), info)
        _replace_dir(staging, os.path.join(model_dir, ONNX_DIR))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record_export(model_dir, info)
    return info


def record_export(model_dir: str, export: dict) -> None:
    """The export's note in distill_info.json (key `export`) and in the model card."""
    path = os.path.join(model_dir, card.INFO_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        info = json.load(f)
    write_json_atomic(path, {**info, "export": export})
    card.update(model_dir)


def _replace_dir(new: str, target: str) -> None:
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".onnx-old-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(old, ONNX_DIR))
    os.rename(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- serving measurements


def _memory_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak resident memory added inside the block (MB; Linux only, else None): the process's high-water mark is
    reset first (/proc/self/clear_refs), so each runtime is measured on its own."""
    gc.collect()
    result = {"peak_memory_mb": None}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _memory_kb("VmRSS")
    except OSError:
        before = None
    yield result
    peak = _memory_kb("VmHWM")
    if before is not None and peak is not None:
        result["peak_memory_mb"] = round((peak - before) / 1024, 1)


def measure_serving(
    load: Callable[[], Callable],
    tokenizer,
    texts: list[str],
    batch_size: int,
    batch_one_texts: int,
    max_length: int,
    multi_label: bool,
) -> tuple[np.ndarray, dict]:
    """Load a runtime and serve `texts` with it: probabilities, load seconds, texts/s at `batch_size` (all texts) and
    at batch 1 (the first `batch_one_texts`), and the peak memory loading and serving took."""
    with peak_memory() as memory:
        started = time.perf_counter()
        classifier = load()
        load_seconds = time.perf_counter() - started
        out, speed = predict(classifier, tokenizer, texts, batch_size, max_length, multi_label)
        _, speed_one = predict(classifier, tokenizer, texts[:batch_one_texts], 1, max_length, multi_label)
        del classifier
    return out, {
        "load_seconds": round(load_seconds, 3),
        "texts_per_second": speed,
        "texts_per_second_batch_1": speed_one,
        "batch_size": batch_size,
        "batch_one_texts": min(batch_one_texts, len(texts)),
        **memory,
    }
