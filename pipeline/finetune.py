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

from . import store
from .backbones import Backbone, load_backbone
from .errors import UserError
from .export import attach_head, build_classifier, save_scripted
from .labels import ClassMap, LabelSource
from .probe import Standardizer, fit_lbfgs

log = logging.getLogger(__name__)
CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of ``embedpipe finetune``."""

    unfreeze: int = 1
    model: str = "default"
    weights: str = "default"
    input_size: int | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3  # head
    backbone_lr_factor: float = 0.1  # backbone blocks get lr * factor
    weight_decay: float = 0.05
    hflip: bool = True
    label_field: str | None = None
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    compare_probe: bool = True
    stop_after: int | None = None  # stop after this many epochs in this run (tests, time-boxed jobs)

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.unfreeze < 0:
            raise UserError("--unfreeze must be >= 0 (0 trains the head only)")
        if self.lr <= 0 or self.backbone_lr_factor < 0:
            raise UserError("--lr must be > 0 and --backbone-lr-factor >= 0")


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


def scan_tar_labels(urls: Sequence[str], source: LabelSource) -> list[Any]:
    """Labels of every sample (from ``.cls``, or a ``.json`` field), reading no pixels."""
    from .reader import iter_tar_samples

    raw = []
    for url in urls:
        for s in iter_tar_samples(url):
            if source.field:
                raw.append(source.value({"json": [s.get("json", b"").decode("utf-8", "replace") or None]}, 0))
            else:
                cls = s.get("cls")
                raw.append(int(cls.decode().strip()) if cls and cls.strip().isdigit() else None)
    return raw


def batches(urls: Sequence[str], bb: Backbone, opts: FinetuneOptions, cmap: ClassMap, train: bool, epoch: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 crops and class ids from the shards (the embed stage's reader), shuffled and augmented in training."""
    from torch.utils.data import DataLoader

    from .reader import ShardSamples

    rng = np.random.default_rng([opts.seed, epoch])
    order = [urls[i] for i in rng.permutation(len(urls))] if train else list(urls)
    ds = ShardSamples(order, bb.preprocess, opts.batch_size, keep=("json",) if opts.label_field else ())
    source = LabelSource.make(field=opts.label_field)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + epoch)
    for piece in DataLoader(ds, batch_size=None, num_workers=opts.workers):
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
    def __init__(self, model: nn.Module, bb: Backbone):
        super().__init__()
        self.model = model
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(bb.preprocess.std))).view(1, 3, 1, 1).float())
        self.register_buffer("shift", (-torch.tensor(bb.preprocess.mean) / torch.tensor(bb.preprocess.std)).view(1, 3, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


def evaluate(net: Net, urls, bb, opts, cmap, dev) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches(urls, bb, opts, cmap, False, 0):
            correct += int((net(x.to(dev)).argmax(1).cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


def probe_baseline(bb: Backbone, urls, val_urls, opts, cmap, dev) -> float:
    """The linear probe on the same split: frozen features (L2-normalised, as `embed` stores them) + L-BFGS."""
    feats = Net(bb.model, bb).to(dev).eval()

    def collect(u):
        xs, ys = [], []
        with torch.no_grad():
            for x, y in batches(u, bb, opts, cmap, False, 0):
                xs.append(F.normalize(feats(x.to(dev)).float(), dim=1).cpu())
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)
    xt, yt = collect(urls)
    xv, yv = collect(val_urls)
    std = Standardizer.from_sums(xt.double().sum(0).numpy(), xt.double().pow(2).sum(0).numpy(), len(yt))
    grid = fit_lbfgs(std(xt), yt, len(cmap), (1e-5, 1e-4, 1e-3, 1e-2))
    return max(float(((std(xv) @ grid.weight[g].T + grid.bias[g]).argmax(1) == yv).float().mean())
               for g in range(len(grid.params)))


def run_finetune(shards: Sequence[str], val_shards: Sequence[str], out: str | Path,
                 opts: FinetuneOptions = FinetuneOptions()) -> dict[str, Any]:
    """Train head + last ``unfreeze`` blocks; ``out/checkpoint.pt`` after every epoch (resumed when present),
    ``out/metrics.json`` and ``out/classifier.pt`` (TorchScript raw-image classifier) at the end.

    Example:
        >>> run_finetune(["data/train-000000.tar"], ["data/val-000000.tar"], "runs/ft", FinetuneOptions(unfreeze=2))
    """
    from .compiler import resolve_device
    from .shards import expand

    opts.check()
    urls, val_urls = expand(list(shards)), expand(list(val_shards))
    if not urls or not val_urls:
        raise UserError("finetune needs training SHARDS and --val SHARDS")
    out = Path(out)
    dev = resolve_device(opts.device)
    source = LabelSource.make(field=opts.label_field)
    cmap = ClassMap.from_labels(scan_tar_labels(urls, source))
    if len(cmap) < 2:
        raise UserError(f"finetune needs at least two classes in the training shards; found {cmap.names}")
    bb = load_backbone(opts.model, opts.weights)
    if opts.input_size:
        from dataclasses import replace
        bb.preprocess = replace(bb.preprocess, input_size=opts.input_size,
                                resize_size=round(opts.input_size * bb.preprocess.resize_size / bb.preprocess.input_size))
    torch.manual_seed(opts.seed)
    head = nn.Linear(bb.num_features, len(cmap))
    model = attach_head(bb, head)
    units = blocks(bb.model, head)
    train_units = [m for _, m in units[len(units) - opts.unfreeze:]] if opts.unfreeze else []
    log.info("finetune: %d blocks; training %s + head", len(units), [n for n, _ in units[len(units) - opts.unfreeze:]])
    for m in train_units:
        m.requires_grad_(True)
    net = Net(model, bb).to(dev)
    params = [{"params": list(head.parameters()), "lr": opts.lr, "weight_decay": 1e-4}]
    bparams = [p for m in train_units for p in m.parameters()]
    if bparams:
        params.append({"params": bparams, "lr": opts.lr * opts.backbone_lr_factor, "weight_decay": opts.weight_decay})
    opt = torch.optim.AdamW(params)
    n_train = sum(1 for v in cmap.encode(scan_tar_labels(urls, source)) if v >= 0)
    total = opts.epochs * math.ceil(n_train / opts.batch_size)
    warm = min(50, max(1, total // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    trainable = {k for k, _ in net.named_parameters() if _.requires_grad} | {
        f"model.{n}" for n, b in model.named_buffers() if any(b is bb_ for m in train_units for bb_ in m.buffers())}
    ck = out / "checkpoint.pt"
    spec = {"model": bb.spec, "weights_sha256": bb.weights_sha256, "unfreeze": opts.unfreeze, "classes": cmap.classes,
            "input_size": bb.preprocess.input_size}
    history: list[dict[str, Any]] = []
    start = 0
    if ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        if state["spec"] != spec:
            raise UserError(f"{ck} was made with other settings ({state['spec']}); use a new --out or delete it")
        net.load_state_dict(state["weights"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], len(state["history"])
        log.info("resuming %s after epoch %d", out, start - 1)
    probe_top1 = None
    if opts.compare_probe:
        probe_top1 = history[0].get("probe_top1") if history else probe_baseline(bb, urls, val_urls, opts, cmap, dev)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    for p in list(head.parameters()) + bparams:
        p.requires_grad_(True)
    ran = 0
    for epoch in range(start, opts.epochs):
        if opts.stop_after is not None and ran >= opts.stop_after:
            break
        t0 = time.perf_counter()
        net.eval()  # frozen blocks keep their BatchNorm statistics
        head.train()
        for m in train_units:
            m.train()
        losses = []
        for x, y in batches(urls, bb, opts, cmap, True, epoch):
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        acc = evaluate(net, val_urls, bb, opts, cmap, dev)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_top1": acc,
                        "seconds": round(time.perf_counter() - t0, 2), "probe_top1": probe_top1})
        log.info("epoch %d: val top-1 %.4f (linear probe %s)", epoch, acc, probe_top1)
        buf = io.BytesIO()
        torch.save({"spec": spec, "weights": {k: v for k, v in net.state_dict().items() if k in trainable},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history}, buf)
        store.atomic_write_bytes(ck, buf.getvalue())
        ran += 1
    result = {"history": history, "probe_top1": probe_top1, "classes": cmap.names, "options": asdict(opts),
              "done": len(history) == opts.epochs, "blocks": [n for n, _ in units],
              "trained_blocks": [n for n, _ in units[len(units) - opts.unfreeze:]] if opts.unfreeze else []}
    if result["done"]:
        net.eval()
        module = build_classifier(model.cpu(), bb.preprocess, cmap.names)
        save_scripted(module, out / "classifier.pt", {"kind": "finetune", "classes": cmap.names,
                                                      "preprocess": bb.preprocess.to_dict(), "model": bb.spec})
        result["classifier"] = str(out / "classifier.pt")
    store.atomic_write_json(out / "metrics.json", json.loads(json.dumps(result, default=str)))
    return result
