"""Fine-tune the head and the last N blocks of a backbone on tar shards; checkpoint each epoch, resume, export."""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .. import atomic
from ..errors import UserError
from ..model.backbones import Backbone, load_backbone
from ..model.preprocess import UInt8Normalize
from ..model.sources import classifier_source
from ..progress import Progress
from .export import attach_head, build_classifier, save_scripted
from .evaluate import evaluate as evaluate_head
from .classes import ClassMap, NameScan
from .labels import Labeled, LabelSource, feed_names, split_rows
from .linear import best_head, choose, fit_in_memory
from .options import FinetuneOptions, ProbeOptions

log = logging.getLogger(__name__)
CONTAINERS = (nn.Sequential, nn.ModuleList)
CHECKPOINT, METRICS, CLASSIFIER = "checkpoint.pt", "metrics.json", "classifier.pt"


def blocks(model: nn.Module, head: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone as an ordered list of blocks: containers (``layer4``, ``blocks``) are opened into their
    children; runs of plain layers between them (stem conv+bn, head conv+bn) count as one block each."""
    out: list[tuple[str, list[nn.Module]]] = []
    plain: list[tuple[str, nn.Module]] = []

    def flush() -> None:
        if plain:
            out.append(("+".join(n for n, _ in plain), [m for _, m in plain]))
            plain.clear()

    def walk(prefix: str, mod: nn.Module, depth: int) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if child is head or not any(True for _ in child.parameters()):
                continue
            if isinstance(child, CONTAINERS) and depth < 2:
                flush()
                walk(full + ".", child, depth + 1)
            elif isinstance(child, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm)) and depth == 0:
                plain.append((full, child))
            else:
                flush()
                out.append((full, [child]))
    walk("", model, 0)
    flush()
    return [(n, ms[0] if len(ms) == 1 else nn.ModuleList(ms)) for n, ms in out]


def scan_tar_labels(urls: Sequence[str], source: LabelSource, scan: NameScan | None = None) -> list[Any]:
    """Labels of every sample (from ``.cls``, or a ``.json`` field), reading no pixels; the samples' names for
    their ``.cls`` labels (``.json`` label, ``.txt``) go to ``scan``."""
    from ..embedding.tar import iter_tar_samples

    raw: list[Any] = []
    for url in urls:
        labels: list[Any] = []
        text: dict[str, list[str | None]] = {"json": [], "txt": []}
        for s in iter_tar_samples(url):
            for k in text:
                text[k].append(s[k].decode("utf-8", "replace") if s.get(k) else None)
            if source.field:
                labels.append(source.value({"json": text["json"][-1:]}, 0))
            else:
                cls = s.get("cls")
                labels.append(int(cls.decode().strip()) if cls and cls.strip().isdigit() else None)
        if not source.field:
            feed_names(scan, labels, {k: v for k, v in text.items() if any(x is not None for x in v)})
        raw += labels
    return raw


def batches(urls: Sequence[str], bb: Backbone, opts: FinetuneOptions, cmap: ClassMap, train: bool, epoch: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 crops and class ids from the shards (the embed stage's reader), shuffled and augmented in training."""
    from torch.utils.data import DataLoader

    from ..embedding.reader import ShardSamples

    rng = np.random.default_rng([opts.seed, epoch])
    order = [urls[i] for i in rng.permutation(len(urls))] if train else list(urls)
    ds = ShardSamples(order, bb.preprocess, opts.batch_size, keep=("json",) if opts.label_field else ())
    source = LabelSource.make(field=opts.label_field)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + epoch)
    for piece in DataLoader(ds, batch_size=None, num_workers=opts.workers):
        if piece.failed:  # training on part of the data would not be what was asked for
            raise UserError(f"cannot read the shard {piece.url}: {piece.failed}")
        if not len(piece.keys):
            continue
        raw = source.values(piece.extra, len(piece.keys)) if opts.label_field else piece.labels
        y = torch.from_numpy(cmap.encode(raw))
        keep = y >= 0
        x, y = piece.images[keep], y[keep]
        if train and len(y):
            perm = torch.randperm(len(y), generator=gen)
            x, y = augment(x[perm], gen, opts.hflip), y[perm]
        if len(y):
            yield x, y


def augment(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Light augmentation on uint8 crops: a random crop of 80-100% of the side resized back, optional flip."""
    s = x.shape[-1]
    out = []
    for img in x:
        side = int(s * (0.8 + 0.2 * float(torch.rand(1, generator=gen))))
        i, j = (int(torch.randint(0, s - side + 1, (1,), generator=gen)) for _ in range(2))
        img = TF.resized_crop(img, i, j, side, side, [s, s], antialias=True)
        if hflip and float(torch.rand(1, generator=gen)) < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


class Net(nn.Module):
    """uint8 crops -> the one normaliser -> the network with its new head."""

    def __init__(self, model: nn.Module, bb: Backbone):
        super().__init__()
        self.normalize = UInt8Normalize(bb.preprocess.mean, bb.preprocess.std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def evaluate(net: Net, urls, bb, opts, cmap, dev, desc: str = "finetune validation") -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad(), Progress(log, desc, unit="img") as bar:
        for x, y in batches(urls, bb, opts, cmap, False, 0):
            correct += int((net(x.to(dev)).argmax(1).cpu() == y).sum())
            total += len(y)
            bar.update(len(y))
    return correct / max(total, 1)


def frozen_features(urls: Sequence[str], bb: Backbone, opts: FinetuneOptions, dev: torch.device, desc: str,
                    total: int | None = None) -> tuple[list[str], list[str], list[Any], np.ndarray]:
    """Keys, shard urls, raw labels and L2-normalised frozen features (what ``embed`` stores, in float32) of every
    sample, labelled or not, in shard order."""
    from torch.utils.data import DataLoader

    from ..embedding.reader import ShardSamples

    source = LabelSource.make(field=opts.label_field)
    ds = ShardSamples(list(urls), bb.preprocess, opts.batch_size, keep=("json",) if opts.label_field else ())
    feats = Net(bb.model, bb).to(dev).eval()
    keys: list[str] = []
    shards: list[str] = []
    raw: list[Any] = []
    xs: list[np.ndarray] = []
    with torch.no_grad(), Progress(log, desc, total=total, unit="img") as bar:
        for piece in DataLoader(ds, batch_size=None, num_workers=opts.workers):
            if piece.failed:
                raise UserError(f"cannot read the shard {piece.url}: {piece.failed}")
            n = len(piece.keys)
            if not n:
                continue
            keys += piece.keys
            shards += [piece.url] * n
            raw += source.values(piece.extra, n) if opts.label_field else list(piece.labels)
            xs.append(F.normalize(feats(piece.images.to(dev)).float(), dim=1).cpu().numpy())
            bar.update(n)
    if not xs:
        raise UserError(f"no sample could be read from {', '.join(list(urls)[:3])}")
    return keys, shards, raw, np.concatenate(xs)


def _labeled(keys: list[str], shards: list[str], x: np.ndarray, raw: list[Any], ids: np.ndarray, mask: np.ndarray
             ) -> Labeled:
    idx = np.flatnonzero(mask)
    return Labeled([keys[i] for i in idx], [shards[i] for i in idx], x[idx], ids[idx], [raw[i] for i in idx])


def probe_baseline(bb: Backbone, urls: Sequence[str], val_urls: Sequence[str], opts: FinetuneOptions,
                   dev: torch.device, n_train: int | None = None) -> dict[str, Any]:
    """``embedpipe probe`` on the same split: the frozen backbone's features (its head still removed, as ``embed``
    computes them), the one split policy (``--val`` = the validation shards) and the probe's in-memory fit with
    its defaults. Returns ``{"top1", "weight_decay", "train", "val"}``."""
    source = LabelSource.make(field=opts.label_field)
    log.info("finetune: linear probe baseline on the frozen features of %d training and %d validation shard(s)",
             len(urls), len(val_urls))
    keys, shards, raw, x = frozen_features(urls, bb, opts, dev, "finetune baseline: training features", n_train)
    vkeys, vshards, vraw, vx = frozen_features(val_urls, bb, opts, dev, "finetune baseline: validation features")
    split = split_rows(keys, shards, raw, source, "the training shards", vraw, "the --val shards")
    train = _labeled(keys, shards, x, raw, split.train_ids, split.train_mask)
    val = _labeled(vkeys, vshards, vx, vraw, split.val_ids, split.val_mask)
    popts = ProbeOptions(label_field=opts.label_field, method="lbfgs", seed=opts.seed)
    torch.manual_seed(popts.seed)
    grid, std, scores = fit_in_memory(train, val, len(split.cmap), popts)
    best = choose(scores)
    head = best_head(grid, std, best, split.cmap, source, None)
    top1 = evaluate_head(head, [(val.x, val.y)], split.cmap.names)["top1"]
    wd = grid.params[best]["weight_decay"]
    log.info("finetune: linear probe baseline: val top-1 %.2f%% (weight decay %g; %d train, %d val images)",
             top1 * 100, wd, len(train.y), len(val.y))
    return {"top1": top1, "weight_decay": wd, "train": len(train.y), "val": len(val.y)}


@dataclass
class _Setup:
    """The network being trained: backbone + new head, its blocks, and which of them train."""

    bb: Backbone
    head: nn.Linear
    model: nn.Module
    units: list[tuple[str, nn.Module]]
    trained_names: list[str]
    train_units: list[nn.Module]
    net: Net

    def backbone_params(self) -> list[nn.Parameter]:
        return [p for m in self.train_units for p in m.parameters()]

    def trainable_keys(self) -> set[str]:
        """State-dict keys that training changes (and checkpoints hold): trainable parameters, their blocks' buffers."""
        buffers = {id(b) for m in self.train_units for b in m.buffers()}
        return {k for k, p in self.net.named_parameters() if p.requires_grad} | {
            f"model.{n}" for n, b in self.model.named_buffers() if id(b) in buffers}


def _setup(bb: Backbone, cmap: ClassMap, opts: FinetuneOptions, dev: torch.device) -> _Setup:
    torch.manual_seed(opts.seed)
    head = nn.Linear(bb.num_features, len(cmap))
    model = attach_head(bb, head)
    units = blocks(bb.model, head)
    trained = units[len(units) - opts.unfreeze:] if opts.unfreeze else []
    for _, m in trained:
        m.requires_grad_(True)
    s = _Setup(bb, head, model, units, [n for n, _ in trained], [m for _, m in trained], Net(model, bb).to(dev))
    log.info("finetune: %d blocks; training %s + head", len(units), s.trained_names)
    return s


def _optimizer(s: _Setup, opts: FinetuneOptions, n_train: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW: the head at ``lr``, unfrozen blocks at ``lr * backbone_lr_factor``; linear warm-up, cosine decay."""
    params = [{"params": list(s.head.parameters()), "lr": opts.lr, "weight_decay": 1e-4}]
    if s.backbone_params():
        params.append({"params": s.backbone_params(), "lr": opts.lr * opts.backbone_lr_factor,
                       "weight_decay": opts.weight_decay})
    opt = torch.optim.AdamW(params)
    total = opts.epochs * math.ceil(n_train / opts.batch_size)
    warm = min(50, max(1, total // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / warm if step < warm else
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm)))))
    return opt, sched


def _train_epoch(s: _Setup, urls: Sequence[str], opts: FinetuneOptions, cmap: ClassMap, epoch: int, n_train: int,
                 dev: torch.device, opt: torch.optim.Optimizer, sched: Any) -> float | None:
    """One pass over the training shards; the mean training loss."""
    s.net.eval()  # frozen blocks keep their BatchNorm statistics
    s.head.train()
    for m in s.train_units:
        m.train()
    losses = []
    with Progress(log, f"finetune epoch {epoch + 1}/{opts.epochs}", total=n_train, unit="img") as bar:
        for x, y in batches(urls, s.bb, opts, cmap, True, epoch):
            loss = F.cross_entropy(s.net(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(len(y))
            bar.status(f"loss {np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)) if losses else None


def _read_checkpoint(ck: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's state, refused when made with other settings; None without one."""
    if not ck.exists():
        return None
    state = torch.load(ck, map_location="cpu", weights_only=True)
    if state["spec"] != spec:
        raise UserError(f"{ck} was made with other settings ({state['spec']}); use a new --out or delete it")
    return state


def _resume(state: dict[str, Any] | None, where: Path, s: _Setup, opt: torch.optim.Optimizer, sched: Any
            ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The history of the epochs a checkpoint holds (their weights and optimizer state loaded) and its best epoch
    (``{"epoch", "weights"}``), or ``([], None)``."""
    if state is None:
        return [], None
    s.net.load_state_dict(state["weights"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log.info("resuming %s after epoch %d", where, len(state["history"]))
    # checkpoints written before the best epoch was kept: the last epoch stands for it
    best = state.get("best") or {"epoch": len(state["history"]) - 1, "weights": state["weights"]}
    return state["history"], best


def run_finetune(shards: Sequence[str], val_shards: Sequence[str], out: str | Path,
                 opts: FinetuneOptions | None = None) -> dict[str, Any]:
    """Train head + last ``unfreeze`` blocks; ``out/checkpoint.pt`` after every epoch (resumed when present; it
    holds the last epoch's weights and the best epoch's), ``out/metrics.json`` and ``out/classifier.pt``
    (TorchScript raw-image classifier, the best epoch's weights) at the end. With ``compare_probe``, the
    baseline is ``embedpipe probe`` on the frozen features of the same split (:func:`probe_baseline`).

    Example:
        >>> run_finetune(["data/train-000000.tar"], ["data/val-000000.tar"], "runs/ft",
        ...              FinetuneOptions(unfreeze=2))  # doctest: +SKIP
    """
    from ..embedding.shards import expand, is_url
    from ..model.device import resolve_device

    opts = opts or FinetuneOptions()
    opts.check()
    classifier_source(opts.model, "finetune")  # the new head goes where the classifier was: refused before any data
    urls, val_urls = expand(list(shards)), expand(list(val_shards))
    if not urls or not val_urls:
        raise UserError("finetune needs training SHARDS and --val SHARDS")
    missing = [u for u in urls + val_urls if not is_url(u) and not Path(u).is_file()]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist ({len(missing)} missing); check the paths")
    out = Path(out)
    dev = resolve_device(opts.device)
    log.info("finetune: reading the labels of %d training shard(s)", len(urls))
    scan = NameScan()
    labels = scan_tar_labels(urls, LabelSource.make(field=opts.label_field), scan)
    cmap, _ = ClassMap.from_labels(labels).named(scan, opts.class_names)
    if len(cmap) < 2:
        raise UserError(f"finetune needs at least two classes in the training shards; found {cmap.names}")
    bb = load_backbone(opts.model, opts.weights, input_size=opts.input_size)
    ck = out / CHECKPOINT
    spec = {"model": bb.spec, "weights_sha256": bb.weights_sha256, "unfreeze": opts.unfreeze, "classes": cmap.classes,
            "input_size": bb.preprocess.input_size}
    state = _read_checkpoint(ck, spec)
    probe_top1 = None
    if opts.compare_probe:  # before the new head goes on: the probe's features are the frozen backbone's
        if state and state["history"]:
            probe_top1 = state["history"][0].get("probe_top1")
        else:
            probe_top1 = probe_baseline(bb, urls, val_urls, opts, dev, len(labels))["top1"]
    s = _setup(bb, cmap, opts, dev)
    n_train = int((cmap.encode(labels) >= 0).sum())
    opt, sched = _optimizer(s, opts, n_train)
    history, best = _resume(state, out, s, opt, sched)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    for p in list(s.head.parameters()) + s.backbone_params():
        p.requires_grad_(True)
    keep = s.trainable_keys()
    first = len(history)
    for epoch in range(first, opts.epochs):
        if opts.stop_after is not None and epoch - first >= opts.stop_after:
            break
        t0 = time.perf_counter()
        loss = _train_epoch(s, urls, opts, cmap, epoch, n_train, dev, opt, sched)
        acc = evaluate(s.net, val_urls, bb, opts, cmap, dev, f"finetune epoch {epoch + 1}/{opts.epochs} validation")
        history.append({"epoch": epoch, "train_loss": loss, "val_top1": acc, "seconds": round(time.perf_counter() - t0, 2),
                        "probe_top1": probe_top1})
        weights = {k: v.detach().clone() for k, v in s.net.state_dict().items() if k in keep}
        if best is None or acc > history[best["epoch"]]["val_top1"]:  # ties keep the earlier epoch
            best = {"epoch": epoch, "weights": weights}
        log.info("finetune epoch %d/%d: val top-1 %.2f%%, train loss %s; best %.2f%% (epoch %d)%s", epoch + 1,
                 opts.epochs, acc * 100, "n/a" if loss is None else f"{loss:.3f}",
                 history[best["epoch"]]["val_top1"] * 100, best["epoch"] + 1,
                 "" if probe_top1 is None else f"; linear probe {probe_top1 * 100:.2f}%")
        buf = io.BytesIO()
        torch.save({"spec": spec, "weights": weights, "best": best, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "history": history}, buf)
        atomic.write_bytes(ck, buf.getvalue())  # the epoch is done: a killed run resumes after it
    result = {"history": history, "probe_top1": probe_top1, "classes": cmap.names, "options": asdict(opts),
              "done": len(history) == opts.epochs, "blocks": [n for n, _ in s.units], "trained_blocks": s.trained_names,
              "best_epoch": best["epoch"] if best else None,
              "best_val_top1": history[best["epoch"]]["val_top1"] if best else None}
    if result["done"]:
        s.net.load_state_dict(best["weights"], strict=False)  # the classifier is the best epoch's, not the last's
        s.net.eval()
        module = build_classifier(s.model.cpu(), bb.preprocess, cmap.names)
        save_scripted(module, out / CLASSIFIER, {"kind": "finetune", "classes": cmap.names,
                                                 "preprocess": bb.preprocess.to_dict(), "model": bb.spec})
        result["classifier"] = str(out / CLASSIFIER)
    atomic.write_json(out / METRICS, json.loads(json.dumps(result, default=str)))
    return result
