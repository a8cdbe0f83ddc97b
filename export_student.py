"""Export a trained student for serving without PyTorch: ONNX fp32 and int8 in <model>/onnx/, parity-checked.

    python export_student.py --model students/topics

`train_student.py --export onnx` does the same right after training. Parity (top-1 agreement with the PyTorch
student, largest probability difference) is measured on the held-out rows of the student's cache, which it never
trained on; without that cache, give texts with --parity_file. The result is noted in distill_info.json (`export`)
and the model card; `evaluate.py --onnx` scores the exported files beside the PyTorch student.
"""

import dataclasses
import json
import os
import sys

from zsdistill import cache, card, data, serving
from zsdistill.errors import UserError, run_cli, writing_to
from zsdistill.options import cli, option
from zsdistill.targets import holdout_split


def log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def held_out_texts(model_dir: str, info: dict) -> list[str]:
    """The texts of the cache rows the student was not trained on (the same split as train_student.py's)."""
    cache_path = info.get("cache")
    if not cache_path or not os.path.exists(os.path.join(cache_path, "manifest.json")):
        raise UserError(
            f"the cache the student in {model_dir} was trained on ({cache_path}) is not here, and parity is measured "
            f"on its "
            f"held-out texts: give --parity_file with texts to check the export on (one per line, or .jsonl/.csv)"
        )
    manifest, table = cache.load_cache(cache_path, verify=False)
    _, rows = holdout_split(manifest["num_examples"], info["holdout_fraction"], info.get("max_holdout_examples"))
    return serving.parity_texts(table, rows)


@dataclasses.dataclass(kw_only=True)
class ExportOptions:
    """export_student.py's flags."""

    model: str = option(help="a student directory written by train_student.py.")
    parity_file: str | None = option(None, "texts to measure parity on (default: the held-out rows of its cache).")
    text_column: str = option("text", "text column of a tabular --parity_file.")

    def __post_init__(self):
        self.model = str(self.model)
        if not os.path.exists(os.path.join(self.model, card.INFO_FILE)):
            raise UserError(
                f"--model {self.model!r} is not a student directory (no {card.INFO_FILE}); pass the --output_dir of "
                f"train_student.py"
            )


def export(options: ExportOptions) -> dict:
    """Export the student in --model to ONNX (onnx/model.onnx, onnx/model_quantized.onnx) with a parity check."""
    serving.require_runtime(export=True)
    with open(os.path.join(options.model, card.INFO_FILE)) as f:
        info = json.load(f)
    if options.parity_file:
        texts = list(data.iter_texts(str(options.parity_file), str(options.text_column)))[: serving.MAX_PARITY_TEXTS]
        source = f"texts of {options.parity_file}"
    else:
        texts, source = held_out_texts(options.model, info), "held-out texts of its cache"
    with writing_to(options.model, "the ONNX export", "free space there; nothing half-written was left"):
        exported = serving.export_student(options.model, texts, source, log)
    print(os.path.join(options.model, serving.ONNX_DIR))
    return exported


main = cli(ExportOptions, export, "Export a trained student to ONNX (fp32 and int8) with a parity check.")


if __name__ == "__main__":
    run_cli(main)
