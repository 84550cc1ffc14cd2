"""`embedpipe demo`: the whole mission on real labelled images, offline: shards -> embed -> index -> search -> probe."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import atomic, store


def precision_at_k(index: Any, keys: list[str], label_of: dict[str, int], k: int = 10,
                   group_of: dict[str, Any] | None = None) -> float:
    """Mean share of each item's k nearest neighbours (itself excluded) that carry its label; with ``group_of``,
    neighbours of the item's own group (variants of the same photo: near copies) are passed over."""
    hits, total = 0, 0
    extra = max(Counter(group_of.values()).values(), default=1) - 1 if group_of else 0
    for start in range(0, len(keys), 512):
        chunk = keys[start:start + 512]
        res = index.search_keys(chunk, k=k + extra)
        for q, row in zip(chunk, res.keys):
            if group_of:
                row = [n for n in row if group_of.get(n) is None or group_of.get(n) != group_of.get(q)][:k]
            labels = [label_of[n] for n in row if n in label_of]
            hits += sum(lab == label_of[q] for lab in labels)
            total += len(labels)
    return hits / max(total, 1)


def run_demo(out: str | Path, dataset: str = "digits", echo: Callable[[str], None] = print,
             model: str = "default", limit: int | None = None, image_size: int = 224) -> dict[str, Any]:
    """Run every stage on sample data written from installed packages and return the headline numbers."""
    from .embedding.runner import embed
    from .index.build import run_index
    from .index.options import IndexConfig
    from .index.search import open_index
    from .probe.knn import run_knn
    from .probe.labels import LabelSource
    from .probe.linear import run_probe
    from .probe.options import ProbeOptions
    from .sample_data import GROUP_FIELDS, write_sample_shards

    out = Path(out)
    t0 = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        steps[name] = round(time.perf_counter() - t, 1)

    echo(f"[1/6] writing {dataset} sample shards (real images from installed packages) to {out / 'shards'}")
    t = time.perf_counter()
    shard_dir = out / "shards"
    shards = sorted(shard_dir.glob(f"{dataset}-*.tar")) if shard_dir.is_dir() else []
    if not shards:
        shards = write_sample_shards(shard_dir, dataset=dataset, image_size=image_size, limit=limit)
    step("sample-data", t)

    echo(f"[2/6] embedding {len(shards)} shards with {model} (pretrained, frozen) -> {out / 'emb'}")
    t = time.perf_counter()
    summary = embed([str(s) for s in shards], out / "emb", model=model, quiet=True)
    echo("      " + summary.line())
    step("embed", t)

    echo(f"[3/6] building a FAISS index -> {out / 'index'}")
    t = time.perf_counter()
    info = run_index(IndexConfig(str(out / "emb"), out=str(out / "index"), overwrite=True))
    echo("      " + info["summary"])
    step("index", t)

    echo("[4/6] nearest neighbours (same label = a hit)")
    t = time.perf_counter()
    # Variants of one photo are near copies: neighbours, and a split, across them would test memory, not features.
    group = GROUP_FIELDS.get(dataset)
    rows = store.read_all(out / "emb", columns=["json"] if group else [])
    label_of = {k: lab for k, lab in zip(rows.keys, rows.labels) if lab is not None}
    group_of = None
    if group:
        group_of = dict(zip(rows.keys, LabelSource.make(field=group).values(rows.extra, len(rows.keys))))
    index = open_index(out / "index")
    rng = np.random.default_rng(0)
    for q in rng.choice(rows.keys, size=3, replace=False).tolist():
        hits = index.search_keys([q], k=5).records()[0]["results"]
        shown = ", ".join(f"{h['key']} (label {label_of.get(h['key'])}, {h['score']:.3f})" for h in hits)
        echo(f"      {q} (label {label_of.get(q)}) -> {shown}")
    p10 = precision_at_k(index, list(label_of), label_of, 10, group_of)
    others = f", neighbours from other {group}s" if group else ""
    echo(f"      precision@10 over all {len(label_of)} items{others}: {p10:.3f} "
         f"(chance: {1 / len(set(label_of.values())):.3f})")
    step("search", t)

    split = f"whole {group}s to one side, by hash" if group else "by key hash"
    echo(f"[5/6] linear probe on frozen features (80/20 split, {split}) -> {out / 'probe'}")
    t = time.perf_counter()
    metrics = run_probe(out / "emb", out / "probe", ProbeOptions(val_fraction=0.2, group_field=group))
    echo(f"      top-1 {metrics['top1'] * 100:.2f}% on {metrics['n_val']} validation images "
         f"(weight decay {metrics['hyperparameters'].get('weight_decay')})")
    step("probe", t)

    echo("[6/6] k-NN classification (cosine, weighted vote)")
    t = time.perf_counter()
    knn = run_knn(out / "emb", val_fraction=0.2, group_field=group, out=out / "knn.json")
    echo("      " + ", ".join(f"k={k}: {v * 100:.2f}%" for k, v in knn["top1"].items()))
    step("knn", t)

    result = {"images": summary.embedded, "precision_at_10": p10, "probe_top1": metrics["top1"],
              "knn_top1": knn["top1"], "seconds": round(time.perf_counter() - t0, 1), "steps": steps,
              "out": str(out)}
    atomic.write_json(out / "demo.json", result)
    echo("")
    echo(f"done in {result['seconds']}s: {summary.embedded} images embedded, precision@10 {p10:.3f}, "
         f"probe top-1 {metrics['top1'] * 100:.2f}%, k-NN top-1 "
         + ", ".join(f"{v * 100:.2f}% (k={k})" for k, v in knn["top1"].items()))
    echo(f"  shards      {shard_dir}/\n  embeddings  {out / 'emb'}/embeddings/*.parquet\n"
         f"  index       {out / 'index'}/ (index.json has the tuned parameters and measured recall)\n"
         f"  probe       {out / 'probe'}/head.pt, metrics.json\n  summary     {out / 'demo.json'}")
    echo(f"try: .venv/bin/embedpipe search {out / 'index'} --key {rows.keys[0]}")
    return result
