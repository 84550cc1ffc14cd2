"""Zero-shot classification from class names (embedpipe probe --zero-shot): the head's rows are the normalised
averaged prompt embeddings of open_clip's own text tower (times its logit scale), written in the probe head
format (predict and --export-classifier take it), evaluated on the linear probe's split; clear errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.errors import UserError
from pipeline.index import synthetic
from pipeline.probe.head import load_head
from pipeline.probe.labels import LabelSource, load_split
from pipeline.probe.linear import run_probe
from pipeline.probe.options import ProbeOptions
from pipeline.probe.predict import run_predict
from pipeline.probe.zero_shot import run_zero_shot

pytestmark = pytest.mark.slow  # CLIP towers and CLI runs: in `make test`, not in the fast subset

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}"]


def embedpipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def zero_shot(clip_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero-shot") / "zs"
    metrics = run_zero_shot(clip_index / "emb", out, DIGITS, TEMPLATES)
    return out, metrics


def test_the_head_is_the_normalised_averaged_prompt_embeddings(zero_shot, tiny_clip):
    out, _ = zero_shot
    head = load_head(out)
    ref = tiny_clip.reference()
    expected = []
    for name in DIGITS:
        e = torch.from_numpy(tiny_clip.text_embeddings([t.format(name) for t in TEMPLATES])).mean(0)
        expected.append(e / e.norm())
    expected = torch.stack(expected) * ref.logit_scale.exp().item()
    assert torch.allclose(head.weight, expected, atol=1e-4) and torch.equal(head.bias, torch.zeros(10))
    assert head.classes == DIGITS and head.feature_spec.model == tiny_clip.spec
    assert not torch.allclose(head.weight[0], head.weight[1])  # the classes differ: the check can fail


def test_it_is_evaluated_on_the_linear_probes_split(zero_shot, clip_index, tmp_path):
    _, zs = zero_shot
    lin = run_probe(clip_index / "emb", tmp_path / "linear", ProbeOptions(val_fraction=0.2))
    assert zs["split"] == lin["split"] and zs["n_val"] == lin["n_val"] and zs["num_classes"] == lin["num_classes"]
    _, val, cmap, _ = load_split(clip_index / "emb", LabelSource(), None, 0.2)
    head = load_head(zero_shot[0])
    pred = (torch.from_numpy(val.x) @ head.weight.T).argmax(1).numpy()
    labels = np.array(cmap.classes)[val.y]  # integer label i is the i-th name
    assert zs["top1"] == pytest.approx(float(np.mean(pred == labels)))
    assert 0 <= zs["top5"] <= 1 and zs["hyperparameters"]["method"] == "zero-shot"
    assert zs["zero_shot"]["templates"] == TEMPLATES


def test_predict_and_export_take_the_zero_shot_head(zero_shot, clip_index, digits_shards, tmp_path):
    out, _ = zero_shot
    res = run_predict(out, clip_index / "emb", tmp_path / "pred")
    rows = store.read_all(clip_index / "emb")
    import pyarrow.parquet as pq

    pred = pq.read_table(tmp_path / "pred").to_pydict()
    head = load_head(out)
    want = (torch.from_numpy(rows.embeddings) @ head.weight.T).argmax(1).numpy()
    assert res["rows"] == len(rows.keys) and pred["key"] == rows.keys
    assert pred["class_name"] == [DIGITS[i] for i in want]

    from pipeline.probe.export import export_classifier
    from torchvision.io import decode_image

    from pipeline.model.deprecations import torchscript_calls

    path = export_classifier(out, tmp_path / "zs.pt")
    with torchscript_calls():
        model = torch.jit.load(str(path))
    with tarfile.open(digits_shards[0]) as tf:
        images = [decode_image(torch.frombuffer(bytearray(tf.extractfile(f"{k}.jpg").read()), dtype=torch.uint8))
                  for k in rows.keys[:20]]
    cls, _ = model.predict(torch.stack(images))
    assert cls.tolist() == want[:20].tolist()


def test_on_the_cli_with_a_classes_file(clip_index, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(DIGITS) + "\n")
    r = embedpipe("probe", clip_index / "emb", "--out", tmp_path / "zs", "--classes-file", classes, "-q")
    assert r.returncode == 0, r.stderr
    assert re.match(r"zero-shot: 10 classes, 1 template\(s\), top-1 \d+\.\d\d%, top-5 \d+\.\d\d% on \d+ val rows "
                    r"\(the linear probe's split\)", r.stdout), r.stdout
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["zero_shot"]["templates"] == ["a photo of a {}."]
    assert (tmp_path / "zs" / "report.txt").read_text().startswith("top-1 ")


def test_a_folder_without_labels_gets_an_unevaluated_head(clip_index, tmp_path):
    ident = store.read_metadata(store.list_shards(clip_index / "emb")[0]).identity
    synthetic.write_shards(tmp_path / "emb", synthetic.EmbeddingLike(dim=48).sample(50, seed=1), shards=1,
                           identity=ident)
    m = run_zero_shot(tmp_path / "emb", tmp_path / "zs", ["cat", "dog"])
    assert m["evaluated"] is False and "top1" not in m and load_head(tmp_path / "zs").classes == ["cat", "dog"]
    assert "not evaluated" in (tmp_path / "zs" / "report.txt").read_text()


def test_bad_zero_shot_requests_are_clear_errors(clip_index, tiny_index, tmp_path):
    r = embedpipe("probe", tiny_index / "emb", "--out", tmp_path / "a", "--zero-shot", "cat,dog")
    assert r.returncode == 2 and "the model torchvision:resnet18 has no text tower" in r.stderr, r.stderr
    with pytest.raises(UserError, match=r"labels \[2, 3, 4, 5, 6\] of .* have no class name among the 2 given"):
        run_zero_shot(clip_index / "emb", tmp_path / "b", ["zero", "one"])
    for args, says in [(["--zero-shot", "cat"], "two or more class names"),
                       (["--zero-shot", "cat,cat,dog"], "class names given twice"),
                       (["--zero-shot", "cat,dog", "--template", "a photo"], "must hold '{}' once"),
                       (["--template", "a {}"], "give the class names once")]:
        r = embedpipe("probe", clip_index / "emb", "--out", tmp_path / "c", *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
    assert not (tmp_path / "c").exists()
