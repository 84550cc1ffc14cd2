"""Recall of text queries against an index of an image-text model's image embeddings, measured when it is built.

Tuning measures recall with rows of the data as queries; text embeddings come from another distribution (CLIP's
text and image embeddings lie in different cones of the sphere), so an approximate index tuned on image rows
can find their neighbours less well. A build whose embeddings record a text tower embeds a set of texts (a
built-in list of generic prompts, or ``--text-queries FILE``), finds their exact neighbours while it adds the
vectors, and records in ``index.json`` (``text_queries``) their recall@1/@10 with the tuned parameters and, for
a kind with a search parameter, the smallest value at which text queries reach the recall target.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..records import EmbeddingMeta
from . import tune

log = logging.getLogger(__name__)

# COCO's 80 object classes, each in two plain captions: generic queries of the kind people type
OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
DEFAULT_TEXTS = tuple(t.format(o) for o in OBJECTS for t in ("a photo of a {}", "a {} seen from far away"))
NONE = "none"  # --text-queries none: measure nothing


def read_texts(path: str | Path, option: str = "--text-queries", none: str = " (or 'none')") -> list[str]:
    """A file of texts, one per line, blank lines skipped (``--text-queries FILE``, search's ``--texts-file``);
    ``none`` is how the error names the option's way out (its ``none`` value), if it has one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {p} does not exist; give a file of texts, one per line{none}")
    try:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {p} is not UTF-8 text ({e}); write one text per line") from None
    if not texts:
        raise UserError(f"{option} {p} holds no text; write one text per line{none}")
    return texts


def embedded_texts(meta: EmbeddingMeta | None, option: str | None) -> tuple[np.ndarray, str] | None:
    """The text queries to measure with, embedded by the model's text tower, and where they came from; None when
    the embeddings record no text tower or ``option`` is ``none``. A tower that cannot be built here (its weights
    moved) is a warning, not a failed build: the index is as good, its text recall unmeasured."""
    if option == NONE or meta is None or meta.identity.text_tower is None:
        return None
    texts, origin = (read_texts(option), str(option)) if option else (list(DEFAULT_TEXTS), "built-in prompts")
    from ..model.rebuild import TextEmbedder

    try:
        x = TextEmbedder(meta).embed_texts(texts)
    except UserError as e:
        log.warning("text queries not measured: the text tower of %s cannot be built here (%s)", meta.model, e)
        return None
    return np.ascontiguousarray(x, np.float32), origin


def text_knn(x: np.ndarray, metric: str) -> tune.ExactKnn:
    """The exact k-NN of the text queries, fed every row of the index (they are never rows of it)."""
    return tune.ExactKnn(x, tune.TUNE_K, metric)


def measure(index: Any, x: np.ndarray, truth: tune.ExactKnn, origin: str, params: dict[str, int],
            space: list[tuple[str, list[int]]], target: float) -> dict[str, Any]:
    """The ``text_queries`` record: recall of the texts with the tuned ``params``, and the smallest value of the
    main search parameter at which they reach ``target`` (the others as tuned); ``params`` are set again after."""
    t0 = time.perf_counter()
    _, gt = truth.result()
    none = np.full(len(x), -1, np.int64)

    def recall(p: dict[str, int]) -> tuple[float, float]:
        tune.set_params(index, p)
        r1, per_query = tune.measure(index, x, none, gt, tune.TUNE_K, extra=0)
        return r1, float(per_query.mean())

    r1, r10 = recall(params)
    rec: dict[str, Any] = {"recall@1": round(r1, 4), "recall@10": round(r10, 4), "queries": len(x), "texts": origin,
                           "params": dict(params), "target_recall": target, "target_reached": r10 >= target,
                           "count": int(index.ntotal)}
    if space and r10 < target:
        main, values = space[0]
        v = tune._smallest(lambda v: recall({**params, main: v})[1], values, target)
        reached = recall({**params, main: v})[1]
        rec["for_target"] = {"params": {**params, main: v}, "recall@10": round(reached, 4),
                             "reached": reached >= target}
    tune.set_params(index, params)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["method"] = ("texts embedded by the text tower the embeddings record, searched with the tuned parameters "
                     "against their exact neighbours among every indexed vector")
    if r10 < target:
        log.warning("text queries reach recall@10 %.3f (target %.3f) with %s%s; image rows reach the target", r10,
                    target, params, f"; {rec['for_target']['params']} gives {rec['for_target']['recall@10']:.3f}"
                    if "for_target" in rec else "")
    return rec


def summary(rec: dict[str, Any] | None) -> str:
    """``; text queries recall@10 0.912 (nprobe=48 reaches 0.95)`` for the summary line, or nothing."""
    if not rec:
        return ""
    more = ""
    if "for_target" in rec:
        ft = rec["for_target"]
        p = ", ".join(f"{k}={v}" for k, v in ft["params"].items())
        more = f" ({p} {'reaches' if ft['reached'] else 'gives'} {ft['recall@10']:.3f})"
    return f"; text queries recall@10 {rec['recall@10']:.3f}{more}"
