"""GPU check, one prepared run of under 5 minutes on one GPU (start-up included): realistic 500x375 JPEG shards made
with every core, then for ResNet-50 fp16 and the default backbone, side by side in one run:

  r_m      the model alone (TorchScript fp16, the measured batch size; ResNet-50 also in the other compile modes)
  C*r_d    the CPU decode bound: the embed stage's cpu decoder with every core decoding at once
  r_gd     the gpu decoder alone: one nvJPEG call per batch, resize and crop on the device
  r_gm     the gpu decoder and the model together in the main process, as the embed loop runs them
  r_w      Parquet writes
  T        ``embedpipe embed`` end to end with --decode cpu and with --decode gpu (16 decode workers)
  E        T over its bound: min(C*r_d, r_m, r_w) for cpu, min(r_gd, r_m, r_w) for gpu
  cos      fp16 vs fp32 (eager) min cosine on real photos, and gpu vs cpu decoder min cosine (same model)
  tutorial webdataset + PIL + torchvision transforms in a DataLoader with 16 workers, model.half().cuda(), the same
           weights and shards; T / T_tutorial

Prints one table and writes JSON. ``GPU_CHECK_SMOKE=1`` runs every step on the CPU with tiny sizes (bf16 for fp16),
to show the script has no error on a machine without a GPU; its numbers mean nothing.

Usage: python benchmarks/gpu_check.py [--json gpu_check.json] [--images 16384]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import _jpeg_in_size_range, bench_photo, decode_rate, write_rate
from pipeline.embedding.feed import decoded_ahead, embedded
from pipeline.embedding.reader import Piece, ShardSamples
from pipeline.embedding.runner import embed
from pipeline.embedding.tar import iter_tar_samples
from pipeline.model.backbones import load_backbone
from pipeline.model.compile import build_extractor
from pipeline.model.decoders import get_decoder
from pipeline.threads import usable_cpus
from pipeline.model.image_header import Header, read_header
from pipeline.model.streams import StreamedEmbedder
from pipeline.model.tuning import images_per_s, tuned_extractor
from pipeline import store

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
HALF = "bf16" if SMOKE else "fp16"  # fp16 is refused on a CPU
# No download on the GPU node: ResNet-50 with seeded random weights, the default backbone's embedded weights.
MODELS = [("torchvision:resnet18" if SMOKE else "torchvision:resnet50", "none"), ("default", "default")]
# The modes --compile auto chooses among besides TorchScript; the smoke run takes eager through the same steps.
OTHER_MODES = ("eager",) if SMOKE else ("inductor", "max-autotune", "aot")
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- shards, with every core

def _one_shard(args: tuple[str, int, int, int, int]) -> list[str]:
    """One shard's JPEGs, written into ``copies`` shards (other keys, the same bytes): T is timed over many images
    for the cost of making a quarter of them (nothing caches decoded pixels, so a copy costs what an image does)."""
    import tarfile

    from pipeline.sample_data import PHOTOS, load_photo

    out, s, size, copies, n_unique = args
    rng = np.random.default_rng(1000 + s)
    photos = [p for p in (load_photo(n) for n in PHOTOS) if min(p.size) >= 300]
    images = []
    for i in range(s * size, min(n_unique, (s + 1) * size)):
        images.append((i, _jpeg_in_size_range(bench_photo(photos[i % len(photos)], rng), rng)))
    paths = []
    for c in range(copies):
        path = Path(out) / f"gpu-c{c}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, jpg in images:
                for ext, data in (("jpg", jpg), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"c{c}img{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def make_shards(out: Path, n: int, shard_size: int, copies: int) -> list[str]:
    """``n`` 500x375 JPEGs of 40-120 KB cut from real photos (as ``embedpipe bench`` makes them; ``n / copies`` of
    them distinct) in shards of ``shard_size``, made by one process per core; copy 0's shards first."""
    out.mkdir(parents=True, exist_ok=True)
    unique = -(-n // copies)
    jobs = [(str(out), s, shard_size, copies, unique) for s in range(-(-unique // shard_size))]
    with ProcessPoolExecutor(usable_cpus()) as pool:
        made = list(pool.map(_one_shard, jobs))
    return [paths[c] for c in range(copies) for paths in made]


# ---------------------------------------------------------------- the measurements

def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def paired_min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    keys = sorted(set(a) & set(b))
    return min_cosine(np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys]))


def encoded_batches(urls: list[str], pre, batch: int, limit: int) -> list[tuple[list[bytes], list[Header]]]:
    """Batches of JPEG bytes with their headers as the workers send them (checked, without PIL's parse)."""
    data = [s["jpg"] for u in urls for s in iter_tar_samples(u)][:limit]
    heads = [Header(h.format, h.width, h.height, h.mode) for h in (read_header(d, pre.resize_size) for d in data)]
    return [(data[i:i + batch], heads[i:i + batch]) for i in range(0, len(data), batch)]


def gpu_decode_rate(batches, pre, seconds: float) -> float:
    """r_gd: the gpu decoder alone on the device (decode, upright, resize, crop), batch after batch."""
    dec, dev = get_decoder("gpu"), torch.device(DEVICE)
    dec.decode(*batches[0], pre, dev)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        for data, heads in batches:
            dec.decode(data, heads, pre, dev)
            n += len(data)
        sync()
    return n / (time.perf_counter() - t0)


def gpu_decode_and_model_rate(batches, bb, ex, seconds: float) -> float:
    """r_gm: the embed loop's main-process side alone: decode a batch ahead in its thread, the model a batch behind."""
    reader = ShardSamples([], bb.preprocess, len(batches[0][0]), decoder="gpu")
    s = bb.preprocess.input_size

    def pieces(rounds: int):
        for _ in range(rounds):
            for data, heads in batches:
                yield Piece("x", torch.empty(0, 3, s, s, dtype=torch.uint8), keys=[str(i) for i in range(len(data))],
                            indices=list(range(len(data))), labels=[None] * len(data), encoded=list(data),
                            headers=list(heads))

    run = StreamedEmbedder(ex, True, "float16")
    t0 = time.perf_counter()
    list(embedded(decoded_ahead(pieces(1), reader, run.streams), run))  # warm, and how long a round takes
    rounds = max(1, int(seconds / max(time.perf_counter() - t0, 1e-3)))
    t0 = time.perf_counter()
    n = sum(len(p.keys) for p, _ in embedded(decoded_ahead(pieces(rounds), reader, run.streams), run))
    return n / (time.perf_counter() - t0)


def tutorial_loop(urls: list[str], spec: str, weights: str, workers: int, batch: int) -> tuple[float, dict]:
    """The loop a tutorial writes for a GPU: webdataset + PIL + torchvision transforms, a DataLoader with
    ``workers`` workers, ``model.half().cuda()``; the same weights (the head replaced as our source replaces it)."""
    import torchvision.transforms as T
    import webdataset as wds

    bb = load_backbone(spec, weights)
    pre = bb.preprocess
    model = bb.model.to(torch.bfloat16 if SMOKE else torch.float16).to(DEVICE).eval()
    tf = T.Compose([T.Resize(pre.resize_size, interpolation=T.InterpolationMode(pre.interpolation)),
                    T.CenterCrop(pre.input_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg")
    ds = ds.map_tuple(lambda k: k, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=DEVICE == "cuda")
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for keys, x in loader:
            feats = torch.nn.functional.normalize(model(x.to(DEVICE).to(model_dtype(model))).float(), dim=1)
            out.update(zip(keys, feats.cpu().numpy()))
    return len(out) / (time.perf_counter() - t0), out


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def compile_mode_rates(spec: str, weights: str, batch: int, cache: str, budget_s: float) -> dict[str, str]:
    """r_m of the compile modes a GPU can choose among (``--compile auto``), each built and timed in a child with
    the time left of ``budget_s``: the builds (minutes for max-autotune) must not push the check past 5 minutes."""
    rates: dict[str, str] = {}
    deadline = time.perf_counter() + budget_s
    code = ("import sys, torch\nfrom pipeline.model.backbones import load_backbone\n"
            "from pipeline.model.compile import build_extractor\nfrom pipeline.model.tuning import images_per_s\n"
            "spec, w, mode, b, cache, dev, prec = sys.argv[1:]\nbb = load_backbone(spec, w)\n"
            "ex = build_extractor(bb, dev, prec, mode, cache, micro_batch=0)\ns = bb.preprocess.input_size\n"
            "x = torch.randint(0, 256, (int(b), 3, s, s), dtype=torch.uint8, device=dev)\nex(x)\n"
            "print('RATE', images_per_s(ex, x, 2.0))\n")
    for mode in OTHER_MODES:
        left = deadline - time.perf_counter()
        if left < 20:
            rates[mode] = "not measured (time budget)"
            continue
        # its own session: on a timeout the child and the compile workers it started are ended together
        child = subprocess.Popen([sys.executable, "-c", code, spec, weights, mode, str(batch), cache, DEVICE, HALF],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = child.communicate(timeout=left)
            line = [ln for ln in out.splitlines() if ln.startswith("RATE")]
            rates[mode] = f"{float(line[0].split()[1]):.0f}" if line else f"failed ({err.strip()[-120:]})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            rates[mode] = f"build > {left:.0f} s (time budget)"
    return rates


def check(spec: str, weights: str, urls: list[str], tmp: Path, workers: int, args: argparse.Namespace,
          with_modes: bool) -> dict:
    cache = str(tmp / "cache")
    bb = load_backbone(spec, weights)
    pre = bb.preprocess
    ex = tuned_extractor(bb, DEVICE, HALF, "torchscript", cache, batch_size=args.batch_size)
    batch = ex.batch_size
    fp32 = build_extractor(bb, DEVICE, "fp32", "eager", cache, micro_batch=0)
    r_d, _, photos = decode_rate(urls, bb, args.decode_images)
    x = photos[:batch]
    cos_half = min_cosine(ex(x).float().cpu().numpy(), fp32(x).float().cpu().numpy())
    del fp32
    xb = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch].to(DEVICE)
    ex(xb)
    r_m = images_per_s(ex, xb, args.seconds)
    batches = encoded_batches(urls, pre, batch, args.decode_images)
    r_gd = gpu_decode_rate(batches, pre, args.seconds)
    r_gm = gpu_decode_and_model_rate(batches, bb, ex, args.seconds)
    r_w = write_rate(bb.num_features, "float16")
    C = usable_cpus()
    opts = dict(model=spec, weights=weights, device=DEVICE, precision=HALF, compile="torchscript", quiet=True,
                cache_dir=cache, workers=workers, batch_size=args.batch_size)
    name = spec.replace(":", "_")
    T, outs = {}, {}
    for decode in ("cpu", "gpu"):
        embed(urls[:2], tmp / f"warm-{name}-{decode}", decode=decode, **opts)  # compile cache, batch size measured
        T[decode] = embed(urls, tmp / f"out-{name}-{decode}", decode=decode, **opts).images_per_s
        outs[decode] = store.read_all(tmp / f"out-{name}-{decode}")
    ours, theirs = ({k: e.astype(np.float32) for k, e in zip(outs[d].keys, outs[d].embeddings)} for d in ("cpu", "gpu"))
    cos_decode = paired_min_cosine(ours, theirs)
    T_tut, tut = tutorial_loop(urls[:args.tutorial_shards], spec, weights, workers, batch)
    cos_tut = paired_min_cosine(ours, tut)
    best = max(T.values())
    row = {"model": bb.spec, "batch": batch, "cores": C, "r_m": r_m, "C_r_d": C * r_d, "r_gd": r_gd, "r_gm": r_gm,
           "r_w": r_w, "T_cpu": T["cpu"], "T_gpu": T["gpu"],
           "E_cpu": T["cpu"] / min(C * r_d, r_m, r_w), "E_gpu": T["gpu"] / min(r_gd, r_m, r_w),
           "cos_fp16_fp32": cos_half, "cos_gpu_cpu_decode": cos_decode, "T_tutorial": T_tut,
           "speedup": best / T_tut, "cos_tutorial": cos_tut}
    if with_modes:
        row["r_m_modes"] = {"torchscript": f"{r_m:.0f}", **compile_mode_rates(
            spec, weights, batch, cache, max(0.0, args.budget_s - elapsed() - args.reserve_s))}
    return row


# ---------------------------------------------------------------- the table

ROWS = [("batch size (measured)", "batch", "{:.0f}"), ("r_m model alone, TorchScript fp16", "r_m", "{:.0f}"),
        ("C*r_d CPU decode bound", "C_r_d", "{:.0f}"), ("r_gd GPU decode alone", "r_gd", "{:.0f}"),
        ("r_gm GPU decode + model", "r_gm", "{:.0f}"), ("r_w Parquet write", "r_w", "{:.0f}"),
        ("T --decode cpu", "T_cpu", "{:.0f}"), ("T --decode gpu", "T_gpu", "{:.0f}"),
        ("E cpu = T/min(C*r_d, r_m, r_w)", "E_cpu", "{:.2f}"), ("E gpu = T/min(r_gd, r_m, r_w)", "E_gpu", "{:.2f}"),
        ("fp16 vs fp32 min cosine", "cos_fp16_fp32", "{:.5f}"), ("gpu vs cpu decode min cosine", "cos_gpu_cpu_decode", "{:.5f}"),
        ("T_tutorial (16 workers, half().cuda())", "T_tutorial", "{:.0f}"), ("T / T_tutorial (best T)", "speedup", "{:.2f}"),
        ("tutorial vs ours min cosine", "cos_tutorial", "{:.4f}")]


def table(rows: list[dict], header: str) -> str:
    width, col = 40, 30
    lines = [header, f"{'img/s unless said':<{width}}" + "".join(f"| {r['model']:<{col}}" for r in rows),
             "-" * (width + (col + 2) * len(rows))]
    for label, key, fmt in ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"| {fmt.format(r[key]):<{col}}" for r in rows))
    modes = [m for m in ("torchscript", *OTHER_MODES) if any(m in r.get("r_m_modes", {}) for r in rows)]
    for m in modes:
        lines.append(f"{'r_m --compile ' + m:<{width}}" + "".join(f"| {r.get('r_m_modes', {}).get(m, '-'):<{col}}"
                                                              for r in rows))
    return "\n".join(lines)


def run_gpu_tests(budget_s: float) -> str:
    if budget_s < 10:
        return "pytest -m gpu: not run (time budget)"
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                             capture_output=True, text=True, timeout=budget_s)
        return "pytest -m gpu: " + (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    except subprocess.TimeoutExpired:
        return f"pytest -m gpu: stopped after {budget_s:.0f} s (time budget)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--images", type=int, default=96 if SMOKE else 32768)
    ap.add_argument("--copies", type=int, default=2 if SMOKE else 4, help="each distinct JPEG is in this many shards")
    ap.add_argument("--shard-size", type=int, default=24 if SMOKE else 256)
    ap.add_argument("--batch-size", type=int, default=16 if SMOKE else None, help="default: measured")
    ap.add_argument("--decode-images", type=int, default=32 if SMOKE else 1024)
    ap.add_argument("--tutorial-shards", type=int, default=2 if SMOKE else 32, help="copy 0's first shards")
    ap.add_argument("--seconds", type=float, default=0.2 if SMOKE else 2.0)
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="the whole check after imports (the machine's and Python's start-up come before)")
    ap.add_argument("--reserve-s", type=float, default=110.0, help="kept for the default backbone and pytest -m gpu")
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (GPU_CHECK_SMOKE=1 runs its steps on the CPU)")
    workers = 2 if SMOKE else min(16, usable_cpus())
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-gpu-"))
    t0 = time.perf_counter()
    urls = make_shards(tmp / "shards", args.images, args.shard_size, args.copies)
    made = time.perf_counter() - t0
    rows = [check(spec, w, urls, tmp, workers, args, with_modes=(i == 0)) for i, (spec, w) in enumerate(MODELS)]
    device = "CPU (smoke run: numbers mean nothing)" if SMOKE else torch.cuda.get_device_name(0)
    print(table(rows, f"{device}, {usable_cpus()} cores, {args.images} JPEGs 500x375 in {len(urls)} shards "
                      f"(made in {made:.0f} s), {workers} decode workers"))
    tests = run_gpu_tests(args.budget_s - elapsed())
    print(tests)
    print(f"gpu_check wall time: {elapsed():.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tests": tests, "wall_s": elapsed()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
