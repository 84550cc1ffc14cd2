"""Our linear probe vs scikit-learn's LogisticRegression on the same features and split, side by side.

Usage:
    python benchmarks/bench_probe.py EMB_DIR [--val-fraction 0.2] [--label-field F] [--weight-decays 1e-4,1e-3]
                                     [--json OUT.json]

Both fit the same objective, mean cross-entropy + wd/2 * ||W||^2 on standardised features
(scikit-learn's ``C = 1 / (wd * n_train)``), for every strength of the grid, and each keeps its best on the
validation split. Our side trains the whole grid in one pass (one wide layer, full-batch L-BFGS); scikit-learn
fits one model per strength (lbfgs). Prints accuracy and wall time of each and the time ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.probe.labels import LabelSource, load_split  # noqa: E402
from pipeline.probe.linear import run_probe  # noqa: E402
from pipeline.probe.options import DEFAULT_WDS, ProbeOptions  # noqa: E402


def sklearn_grid(train, val, wds: tuple[float, ...], max_iter: int) -> dict:
    """One LogisticRegression per strength on StandardScaler features; best on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    sc = StandardScaler().fit(train.x)
    xt, xv = sc.transform(train.x), sc.transform(val.x)
    rows = []
    for wd in wds:
        clf = LogisticRegression(C=1.0 / (wd * len(train.y)), max_iter=max_iter)
        clf.fit(xt, train.y)
        rows.append({"weight_decay": wd, "val_top1": float(clf.score(xv, val.y)), "n_iter": int(clf.n_iter_.max())})
    best = max(rows, key=lambda r: r["val_top1"])
    return {"top1": best["val_top1"], "weight_decay": best["weight_decay"], "seconds": time.perf_counter() - t0,
            "grid": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("emb_dir")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--label-column", default=None)
    ap.add_argument("--label-field", default=None)
    ap.add_argument("--weight-decays", default=",".join(f"{w:g}" for w in DEFAULT_WDS))
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="Time each side this many times (best time kept).")
    ap.add_argument("--json", default=None, help="Also write the result here.")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/torch threads for both sides (default 1: fair and stable on shared cores).")
    a = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(a.threads)
    threadpool_limits(a.threads)
    wds = tuple(float(v) for v in a.weight_decays.split(","))
    source = LabelSource.make(a.label_column, a.label_field)

    # Load once for scikit-learn (not timed on either side: our run_probe time below includes its own loading).
    train, val, cmap, _ = load_split(a.emb_dir, source, val_fraction=a.val_fraction)
    ours_t, sk_t = [], []
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = run_probe(a.emb_dir, tmp, ProbeOptions(label_column=a.label_column, label_field=a.label_field,
                                                       val_fraction=a.val_fraction, weight_decays=wds,
                                                       max_iter=a.max_iter, method="lbfgs"))
            ours_t.append(time.perf_counter() - t0)
        sk = sklearn_grid(train, val, wds, a.max_iter)
        sk_t.append(sk["seconds"])
    ours = {"top1": m["top1"], "weight_decay": m["hyperparameters"]["weight_decay"], "seconds": min(ours_t),
            "iterations": m["hyperparameters"].get("iterations")}
    sk["seconds"] = min(sk_t)
    result = {"emb_dir": a.emb_dir, "threads": a.threads, "n_train": len(train.y), "n_val": len(val.y), "dim": int(train.x.shape[1]),
              "classes": len(cmap), "grid": list(wds), "ours": ours, "sklearn": sk,
              "top1_diff_points": round((ours["top1"] - sk["top1"]) * 100, 3),
              "time_ratio_sklearn_over_ours": round(sk["seconds"] / ours["seconds"], 2)}
    print(f"{a.emb_dir}: {len(train.y)} train / {len(val.y)} val rows, dim {train.x.shape[1]}, {len(cmap)} classes, "
          f"{len(wds)} strengths, {a.threads} thread(s) each")
    print(f"{'':12} {'top-1':>8} {'best wd':>9} {'seconds':>9}")
    print(f"{'embedpipe':12} {ours['top1'] * 100:7.2f}% {ours['weight_decay']:9.1e} {ours['seconds']:9.2f}")
    print(f"{'sklearn':12} {sk['top1'] * 100:7.2f}% {sk['weight_decay']:9.1e} {sk['seconds']:9.2f}")
    print(f"difference {result['top1_diff_points']:+.2f} points; embedpipe is "
          f"{result['time_ratio_sklearn_over_ours']:.1f}x faster (sklearn time / ours; ours includes reading Parquet)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
