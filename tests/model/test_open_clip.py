"""The open_clip source: open_clip:ARCH[/PRETRAINED] through the registry, its image embeddings (the embed stage on
real shards) and text embeddings equal open_clip's own, the identity records the text tower, weights from a
checkpoint, seeded random ones, and a pretrained tag offline as a clear error; the compile modes and bf16; models
without a text tower refused with what to use instead."""
from __future__ import annotations

import io
import socket
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import store
from pipeline.errors import UserError
from pipeline.model.backbones import load_backbone, load_classifier
from pipeline.model.compile import build_extractor
from pipeline.model.rebuild import TextEmbedder, rebuild_text_tower
from pipeline.model.text import load_text_tower
from pipeline.records import EmbeddingMeta, ModelIdentity

TEXTS = ["a red car", "a photo of the digit seven", "two dogs on a beach", "an empty street at night"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embed_stores_open_clips_own_image_embedding(clip_index, digits_shards, tiny_clip):
    import open_clip

    rows = store.read_all(clip_index / "emb")
    assert rows.embeddings.shape[1] == 48 and np.allclose(np.linalg.norm(rows.embeddings, axis=1), 1, atol=1e-5)
    ref = tiny_clip.reference()
    pre = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                    std=open_clip.OPENAI_DATASET_STD, interpolation="bicubic", resize_mode="shortest")
    keys = rows.keys[:40]
    with tarfile.open(digits_shards[0]) as tf:  # open_clip's own preprocessing, on the same JPEG bytes
        images = [pre(Image.open(io.BytesIO(tf.extractfile(f"{k}.jpg").read())).convert("RGB")) for k in keys]
    with torch.no_grad():
        theirs = ref.encode_image(torch.stack(images), normalize=True).numpy()
    assert _cosines(rows.embeddings[:40], theirs).min() >= 0.9999


def test_text_embeddings_equal_open_clips_own_encode_text(clip_index, tiny_clip):
    import open_clip

    meta = store.read_metadata(store.list_shards(clip_index / "emb")[0])
    ours = TextEmbedder(meta, device="cpu").embed_texts(TEXTS)
    with torch.no_grad():
        theirs = tiny_clip.reference().encode_text(open_clip.get_tokenizer("Tiny-CLIP-Test")(TEXTS), normalize=True)
    assert ours.shape == (4, 48) and _cosines(ours, theirs.numpy()).min() >= 0.9999
    assert _cosines(ours[:1], ours[1:2])[0] < 0.9999  # different texts, different embeddings: the test can fail


def test_the_identity_records_the_text_tower(clip_index, tiny_clip):
    meta = store.read_metadata(store.list_shards(clip_index / "emb")[0])
    ident = meta.identity
    assert ident.model == tiny_clip.spec and ident.weights == str(tiny_clip.weights.resolve())
    tower = load_text_tower(tiny_clip.spec, str(tiny_clip.weights))
    assert ident.text_tower == tower.record
    assert set(tower.record) == {"model", "weights_sha256", "tokenizer", "context_length"}
    assert tower.record["tokenizer"] == "open_clip:bpe_simple_vocab_16e6" and tower.record["context_length"] == 77
    # written with the metadata and read back; the same record in run.json's fingerprint
    assert EmbeddingMeta.from_dict(meta.to_dict()).identity.text_tower == tower.record
    import json

    assert json.loads((clip_index / "emb" / "run.json").read_text())["fingerprint"]["text_tower"] == tower.record


def test_a_text_tower_other_than_the_recorded_one_is_refused(clip_index, tiny_clip):
    meta = store.read_metadata(store.list_shards(clip_index / "emb")[0])
    other = dict(meta.identity.text_tower, weights_sha256="0" * 64)
    changed = EmbeddingMeta(ModelIdentity(**{**meta.identity.__dict__, "text_tower": other}), meta.dim, meta.dtype)
    with pytest.raises(UserError, match="differs from the one recorded with its vectors .*weights_sha256: recorded '0000"):
        rebuild_text_tower(changed)


def test_random_weights_are_seeded_and_differ_from_the_checkpoint(tiny_clip):
    a, b = load_backbone(tiny_clip.spec, "none"), load_backbone(tiny_clip.spec, "none")
    f = load_backbone(tiny_clip.spec, str(tiny_clip.weights))
    assert a.weights_sha256 == b.weights_sha256 != f.weights_sha256
    assert a.text_tower["weights_sha256"] == b.text_tower["weights_sha256"] != f.text_tower["weights_sha256"]
    assert (a.weights, f.weights) == ("none", str(tiny_clip.weights.resolve()))
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.preprocess.input_size == a.preprocess.resize_size == 32 and a.preprocess.interpolation == "bicubic"


def test_spec_errors_say_what_to_give(tiny_clip, tmp_path):
    with pytest.raises(UserError, match="names no pretrained weights: add a tag .*--weights FILE"):
        load_backbone(tiny_clip.spec)
    with pytest.raises(UserError, match="no pretrained tag 'nope' for ViT-B-32; its tags: openai, "):
        load_backbone("open_clip:ViT-B-32/nope", "none")
    with pytest.raises(UserError, match="no architecture 'ViT-B-3'. Did you mean open_clip:ViT-B-32"):
        load_backbone("open_clip:ViT-B-3", "none")
    with pytest.raises(UserError, match="names its weights .* give one"):
        load_backbone("open_clip:ViT-B-32/openai", str(tiny_clip.weights))
    with pytest.raises(UserError, match="--layer cannot be used with open_clip:"):
        load_backbone(tiny_clip.spec, "none", layer="transformer")
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    with pytest.raises(UserError, match=f"weights {other} do not fit open_clip:Tiny-CLIP-Test"):
        load_backbone(tiny_clip.spec, str(other))
    with pytest.raises(UserError, match="needs a model with a classification head .*open_clip:Tiny-CLIP-Test has none"):
        load_classifier(tiny_clip.spec, "none")


def test_a_pretrained_tag_offline_names_the_tag_and_the_cache(tiny_clip, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("HOME", str(tmp_path))

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)  # this machine offline
    with pytest.raises(UserError) as e:
        load_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k")
    msg = str(e.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in msg and str(tmp_path / "hub" / "models--laion--") in msg
    assert "unreachable" in msg and "--weights PATH" in msg


@pytest.mark.parametrize("compile, precision, least", [("torchscript", "fp32", 0.99999), ("eager", "bf16", 0.999),
                                                       ("torchscript", "bf16", 0.999)])
def test_compile_modes_and_bf16_give_the_same_embeddings(tiny_clip, tmp_path, compile, precision, least):
    bb = load_backbone(tiny_clip.spec, str(tiny_clip.weights))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ref = build_extractor(bb, "cpu", "fp32", "eager", tmp_path)(x)
    ex = build_extractor(bb, "cpu", precision, compile, tmp_path)
    assert torch.nn.functional.cosine_similarity(ex(x), ref).min() >= least
    if compile == "torchscript":  # cached: a second build loads the file
        assert build_extractor(bb, "cpu", precision, compile, tmp_path).cache_hit


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["inductor", "aot"])
def test_inductor_and_aot_give_the_same_embeddings(tiny_clip, tmp_path, compile):
    bb = load_backbone(tiny_clip.spec, str(tiny_clip.weights))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ref = build_extractor(bb, "cpu", "fp32", "eager", tmp_path)(x)
    assert torch.nn.functional.cosine_similarity(build_extractor(bb, "cpu", "fp32", compile, tmp_path)(x),
                                                 ref).min() >= 0.9999


def test_models_without_a_text_tower_are_refused_with_what_to_use(tmp_path):
    timm_clip = EmbeddingMeta(ModelIdentity("timm:vit_base_patch32_clip_224.openai", "ab", None, {}), 768, "float16")
    with pytest.raises(UserError, match=r"timm:vit_base_patch32_clip_224.openai has no text tower.*before CLIP's "
                                        r"projection.*embed the images with open_clip:ViT-B-32/openai instead"):
        rebuild_text_tower(timm_clip)
    for spec in ("torchvision:resnet18", "synthetic:embedding-like", f"torchscript:{tmp_path / 'f.pt'}"):
        meta = EmbeddingMeta(ModelIdentity(spec, "ab", None, {}), 8, "float16")
        with pytest.raises(UserError, match=f"the model {spec} has no text tower"):
            TextEmbedder(meta)
