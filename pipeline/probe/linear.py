"""Linear probes on frozen features: a grid of L2 strengths trained in one pass as one wide linear layer."""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import store
from ..records import EmbeddingMeta
from .evaluate import evaluate
from .head import Head, save_probe
from .classes import ClassMap
from .labels import Labeled, LabelSource, StreamSet, load_split, plan_stream
from .options import ProbeOptions

log = logging.getLogger(__name__)


@dataclass
class GridResult:
    """All heads of the grid: weight ``[G, C, D]`` and bias ``[G, C]`` in standardised feature space."""

    weight: torch.Tensor
    bias: torch.Tensor
    params: list[dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)


def _grid_loss(logits: torch.Tensor, y: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy; logits ``[N, G*C]``."""
    n = logits.shape[0]
    z = logits.view(n, n_heads, -1).transpose(1, 2)  # [N, C, G]
    return F.cross_entropy(z, y[:, None].expand(n, n_heads), reduction="sum") / n


@contextmanager
def _threads_for(flops: int) -> Iterator[None]:
    """One intra-op thread for small matmuls: on busy cores torch's thread pool costs far more than it saves."""
    before = torch.get_num_threads()
    if flops < 50_000_000 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pick_threads(fn: Callable[[], Any]) -> int:
    """Time ``fn`` with torch's thread pool and with one thread; keep the faster (busy shared cores punish pools)."""
    before = torch.get_num_threads()
    if before == 1:
        return 1
    times = {}
    for n in (1, before):
        torch.set_num_threads(n)
        fn()
        t0 = time.perf_counter()
        fn()
        times[n] = time.perf_counter() - t0
    torch.set_num_threads(before)
    return min(times, key=times.get)


def fit_lbfgs(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decays: Sequence[float], max_iter: int = 500,
    tol: float = 1e-4,
) -> GridResult:
    """Full-batch L-BFGS for each weight decay: minimise mean CE + wd/2 * ||W||^2 (bias not penalised).

    The strengths are solved as a regularisation path, strongest first, each warm-started from the previous
    solution (the features are in memory, so the grid costs no extra pass over the data). ``wd`` matches
    scikit-learn's ``C`` as ``wd = 1 / (C * n_train)``; ``tol`` bounds the gradient's largest entry, as
    scikit-learn's lbfgs does.
    """
    n, d = x.shape
    order = sorted(range(len(weight_decays)), key=lambda i: -weight_decays[i])
    weight = torch.zeros(len(weight_decays), n_classes, d)
    bias = torch.zeros(len(weight_decays), n_classes)
    w0, b0 = torch.zeros(d, n_classes), torch.zeros(n_classes)
    iters: list[int] = [0] * len(weight_decays)
    evals = 0
    before = torch.get_num_threads()
    picked = _pick_threads(lambda: torch.addmm(b0, x, w0).logsumexp(1).sum())
    torch.set_num_threads(picked)
    try:
        for i in order:
            lam = float(weight_decays[i])
            w = w0.clone().requires_grad_(True)
            b = b0.clone().requires_grad_(True)
            opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                    tolerance_grad=tol, tolerance_change=1e-12)

            def closure() -> torch.Tensor:
                nonlocal evals
                evals += 1
                opt.zero_grad()
                loss = F.cross_entropy(torch.addmm(b, x, w), y) + 0.5 * lam * w.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            iters[i] = int(opt.state[opt._params[0]].get("n_iter", 0))
            w0, b0 = w.detach(), b.detach()
            weight[i], bias[i] = w0.T, b0
    finally:
        torch.set_num_threads(before)
    info = {"method": "lbfgs", "iterations": sum(iters), "iterations_per_head": iters, "evaluations": evals,
            "converged": all(it < max_iter for it in iters), "tol": tol, "threads": picked}
    return GridResult(weight, bias, [{"weight_decay": v} for v in weight_decays], info)


def fit_sgd(
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    n_train: int,
    dim: int,
    n_classes: int,
    weight_decays: Sequence[float],
    learning_rates: Sequence[float],
    epochs: int = 10,
    on_epoch: Callable[[int, GridResult], None] | None = None,
) -> GridResult:
    """Mini-batch SGD (momentum 0.9, cosine schedule) on a grid of (lr, wd), one wide layer, per-column lr/wd.

    ``batches(epoch)`` yields standardised ``(x, y)`` mini-batches for one epoch.
    """
    params = [{"learning_rate": lr, "weight_decay": wd} for lr in learning_rates for wd in weight_decays]
    g = len(params)
    lr = torch.tensor([p["learning_rate"] for p in params], dtype=torch.float32).repeat_interleave(n_classes)
    wd = torch.tensor([p["weight_decay"] for p in params], dtype=torch.float32).repeat_interleave(n_classes)
    w = torch.zeros(dim, g * n_classes, requires_grad=True)
    b = torch.zeros(g * n_classes, requires_grad=True)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    step, total = 0, None
    threads = _threads_for(1024 * dim * g * n_classes)
    threads.__enter__()
    for epoch in range(epochs):
        for x, y in batches(epoch):
            if total is None:
                total = max(1, epochs * math.ceil(n_train / len(y)))
            scale = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            loss = _grid_loss(torch.addmm(b, x, w), y, g)
            gw, gb = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                mw.mul_(0.9).add_(gw + wd * w)
                mb.mul_(0.9).add_(gb)
                w.sub_(scale * lr * mw)
                b.sub_(scale * lr * mb)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, GridResult(w.detach().T.reshape(g, n_classes, dim), b.detach().view(g, n_classes), params))
    threads.__exit__(None, None, None)
    weight = w.detach().T.reshape(g, n_classes, dim).contiguous()
    return GridResult(weight, b.detach().view(g, n_classes).clone(), params,
                      {"method": "sgd", "epochs": epochs, "steps": step, "momentum": 0.9, "schedule": "cosine"})


@dataclass
class Standardizer:
    """Per-feature mean/std from training rows; folded into the head at the end so it sees raw features."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def identity(cls, dim: int) -> "Standardizer":
        return cls(torch.zeros(dim), torch.ones(dim))

    @classmethod
    def from_sums(cls, s1: np.ndarray, s2: np.ndarray, n: int) -> "Standardizer":
        mean = s1 / n
        var = np.maximum(s2 / n - mean**2, 0.0)
        std = np.sqrt(var)
        std[std < 1e-6 * max(1.0, float(std.max(initial=0)))] = 1.0  # constant features: leave unscaled
        return cls(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W((x-m)/s) + b == (W/s) x + (b - W(m/s))`` for weight ``[..., C, D]``."""
        w = weight / self.std
        return w, bias - (weight * (self.mean / self.std)).sum(-1)


def _grid_val_scores(grid: GridResult, val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
    g, c, d = grid.weight.shape
    wt = grid.weight.reshape(g * c, d).T
    correct = torch.zeros(g)
    nll = torch.zeros(g)
    n = 0
    for x, y in val_batches:
        z = torch.addmm(grid.bias.reshape(-1), x, wt).view(len(y), g, c)
        correct += (z.argmax(-1) == y[:, None]).sum(0).float()
        nll += F.cross_entropy(z.transpose(1, 2), y[:, None].expand(len(y), g), reduction="none").sum(0)
        n += len(y)
    return [{**p, "val_top1": float(correct[i] / n), "val_loss": float(nll[i] / n)} for i, p in enumerate(grid.params)]


def choose(scores: list[dict[str, float]]) -> int:
    """Best validation top-1; ties go to the lower validation loss."""
    return min(range(len(scores)), key=lambda i: (-round(scores[i]["val_top1"], 9), scores[i]["val_loss"]))


def _rows(dataset: StreamSet, std: Standardizer, batch_size: int, seed: int, epoch: int, shuffle: bool
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(dataset.files)) if shuffle else None
    for xb, yb in dataset.batches(file_order=order):
        perm = rng.permutation(len(yb)) if shuffle else np.arange(len(yb))
        x, y = std(torch.from_numpy(xb)), torch.from_numpy(yb)
        for i in range(0, len(perm), batch_size):
            j = torch.from_numpy(perm[i:i + batch_size])
            yield x[j], y[j]


def _fits(path: str | Path, val: str | None, budget_gb: float) -> tuple[bool, float]:
    infos = [store.shard_info(f) for f in store.list_shards(path)]
    if val:
        infos += [store.shard_info(f) for f in store.list_shards(val)]
    ref = store.check_consistent(infos)
    need = sum(i.rows for i in infos) * ref.dim * 4 * 2.5 / 2**30  # float32 copy + standardised + read buffers
    return need <= budget_gb, need


def fit_in_memory(train: Labeled, val: Labeled, n_classes: int, opts: ProbeOptions
                  ) -> tuple[GridResult, Standardizer, list[dict[str, float]]]:
    """The in-memory probe (``--method lbfgs``): standardise on the training rows, fit the L-BFGS grid, score
    every head on the validation rows. ``embedpipe probe`` and fine-tuning's baseline both fit through here."""
    x = torch.from_numpy(train.x)
    std = Standardizer.from_sums(train.x.sum(0, dtype=np.float64), np.square(train.x, dtype=np.float64).sum(0),
                                 len(train.y)) if opts.standardize else Standardizer.identity(x.shape[1])
    with torch.no_grad():
        xs = std(x)
    grid = fit_lbfgs(xs, torch.from_numpy(train.y), n_classes, opts.weight_decays, opts.max_iter)
    return grid, std, _grid_val_scores(grid, [(std(torch.from_numpy(val.x)), torch.from_numpy(val.y))])


def best_head(grid: GridResult, std: Standardizer, best: int, cmap: ClassMap, source: LabelSource,
              feature_spec: EmbeddingMeta | None) -> Head:
    """Head ``best`` of the grid, the standardisation folded in, so it takes raw features; ``cmap``'s classes and
    their names."""
    w, b = std.fold(grid.weight[best], grid.bias[best])
    return Head(weight=w, bias=b, classes=cmap.classes, label_source=source.to_dict(), feature_spec=feature_spec,
                names=cmap.names if cmap.display else None)


def run_probe(emb_dir: str | Path, out: str | Path, opts: ProbeOptions | None = None) -> dict[str, Any]:
    """Train the probe grid, keep the best head on validation, write ``head.pt`` and ``metrics.json``.

    Example:
        >>> metrics = run_probe("runs/digits", "runs/digits-probe", ProbeOptions(val_fraction=0.2))  # doctest: +SKIP
        >>> metrics["top1"]  # doctest: +SKIP
    """
    opts = opts or ProbeOptions()
    opts.check()
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    source = LabelSource.make(opts.label_column, opts.label_field)
    group = LabelSource.make(field=opts.group_field) if opts.group_field else None
    fits, need_gb = _fits(emb_dir, opts.val, opts.max_memory_gb)
    method = opts.method if opts.method != "auto" else ("lbfgs" if fits else "sgd")
    if method == "lbfgs" and not fits:
        log.warning("features need ~%.1f GB, over --max-memory-gb %.1f; L-BFGS loads them anyway", need_gb, opts.max_memory_gb)
    log.info("probe: %s, ~%.2f GB of features, method %s", emb_dir, need_gb, method)
    if method == "lbfgs":
        train, val, cmap, split = load_split(emb_dir, source, opts.val, opts.val_fraction, group, opts.class_names)
        grid, std, scores = fit_in_memory(train, val, len(cmap), opts)
    else:
        strain, sval, cmap, split = plan_stream(emb_dir, source, opts.val, opts.val_fraction, group,
                                                opts.class_names)
        dim = store.shard_info(strain.files[0]).dim
        std = _stream_standardizer(strain, dim) if opts.standardize else Standardizer.identity(dim)
        grid = fit_sgd(lambda e: _rows(strain, std, opts.batch_size, opts.seed, e, True), len(strain), dim, len(cmap),
                       opts.weight_decays, opts.learning_rates, opts.epochs)
        scores = _grid_val_scores(grid, _rows(sval, std, 65536, opts.seed, 0, False))
        val = sval
    best = choose(scores)
    head = best_head(grid, std, best, cmap, source, _feature_spec(emb_dir))
    val_iter = [(val.x, val.y)] if isinstance(val, Labeled) else val.batches()
    metrics = evaluate(head, val_iter, cmap.names)
    metrics.update(
        hyperparameters={**grid.params[best], "method": method, "standardize": opts.standardize, **grid.info},
        grid=scores, split=split, train_seconds=round(time.perf_counter() - t0, 3), emb_dir=str(emb_dir),
        options=asdict(opts),
    )
    save_probe(Path(out), head, metrics, plots=opts.plots)
    return metrics


def _stream_standardizer(train: StreamSet, dim: int) -> Standardizer:
    s1, s2, n = np.zeros(dim), np.zeros(dim), 0
    for xb, _ in train.batches():
        s1 += xb.sum(0, dtype=np.float64)
        s2 += np.square(xb, dtype=np.float64).sum(0)
        n += len(xb)
    return Standardizer.from_sums(s1, s2, n)


def _feature_spec(emb_dir: str | Path) -> EmbeddingMeta | None:
    """What the head expects as input: the embedding run's metadata (model, weights, normalize, ...)."""
    return store.shard_info(store.list_shards(emb_dir)[0]).metadata


@dataclass(frozen=True, repr=False)
class ProbeReport:
    """What ``train_probe`` did: the probe folder and its metrics (``metrics.json``)."""

    path: Path
    metrics: dict[str, Any]

    @property
    def top1(self) -> float:
        return float(self.metrics["top1"])

    @property
    def classes(self) -> list[str]:
        return list(self.metrics["classes"])

    def __repr__(self) -> str:
        m, hp = self.metrics, self.metrics.get("hyperparameters", {})
        top5 = f", top-5 {m['top5'] * 100:.2f}%" if "top5" in m else ""
        wd = hp.get("weight_decay")
        return (f"ProbeReport({str(self.path)!r}: top-1 {self.top1 * 100:.2f}%{top5} on {m['n_val']} val rows, "
                f"{m['num_classes']} classes, {hp.get('method')} wd={wd:g})")
