"""GPU check (under 5 minutes on one GPU): fp16 vs fp32 cosine on real photos, r_m, T and E = T/min(C r_d, r_m)
for the default backbone and resnet50, with CPU decode workers and with nvJPEG decode on the GPU. Prints a
table and writes JSON.

Usage: python benchmarks/gpu_check.py [--json gpu.json] [--images 2048]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.bench import decode_rate, make_bench_shards
from pipeline.embedding.runner import embed
from pipeline.embedding.tar import iter_tar_samples
from pipeline.model.backbones import load_backbone
from pipeline.model.compile import build_extractor
from pipeline.threads import usable_cpus


def model_rate(ex, batch: torch.Tensor, seconds: float = 5.0) -> float:
    ex(batch)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ex(batch)
        n += len(batch)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def nvjpeg_rate(urls: list[str], pre, ex, batch_size: int) -> float:
    """Decode on the GPU (nvJPEG), resize and crop there, then the model: the GPU-decode end-to-end rate."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    raw = [torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8) for u in urls for s in iter_tar_samples(u)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(raw), batch_size):
        imgs = decode_jpeg(raw[i:i + batch_size], device="cuda")
        imgs = [TF.center_crop(TF.resize(im, [pre.resize_size], antialias=True), [pre.input_size] * 2) for im in imgs]
        ex(torch.stack(imgs))
    torch.cuda.synchronize()
    return len(raw) / (time.perf_counter() - t0)


def check(spec: str, weights: str, urls: list[str], tmp: Path, batch_size: int) -> dict:
    bb = load_backbone(spec, weights)
    fp32 = build_extractor(bb, "cuda", "fp32", "eager")
    fp16 = build_extractor(bb, "cuda", "fp16", "torchscript", cache_dir=str(tmp / "cache"))
    r_d, _, photos = decode_rate(urls, bb, batch_size)  # the embed stage's CPU decode per core, all decoding
    x = photos[:batch_size]
    cos = F.cosine_similarity(fp16(x).float(), fp32(x)).min().item()
    x = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)[:batch_size]
    r_m = model_rate(fp16, x.cuda())
    bound = min(usable_cpus() * r_d, r_m)  # GPU model: decode on the CPU cores and the model overlap
    opts = dict(model=spec, weights=weights, device="cuda", precision="fp16", batch_size=batch_size, quiet=True,
                cache_dir=str(tmp / "cache"))
    embed(urls[:1], tmp / f"warm-{spec.replace(':', '_')}", **opts)
    T = embed(urls, tmp / f"out-{spec.replace(':', '_')}", **opts).images_per_s
    T_gpu_decode = nvjpeg_rate(urls, bb.preprocess, fp16, batch_size)
    return {"model": spec, "fp16_vs_fp32_min_cosine": cos, "r_d_per_core": r_d, "cores": usable_cpus(),
            "r_m": r_m, "T_star": bound, "T": T, "E": T / bound,
            "T_nvjpeg": T_gpu_decode, "E_nvjpeg": T_gpu_decode / r_m}  # nvJPEG: decode and model share the GPU


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-gpu-"))
    urls = [str(p) for p in make_bench_shards(tmp / "shards", args.images, shard_size=256)]
    rows = [check("default", "default", urls, tmp, args.batch_size),
            check("torchvision:resnet50", "none", urls, tmp, args.batch_size)]
    print(f"GPU: {torch.cuda.get_device_name(0)}, {args.images} JPEGs ~500x375, batch {args.batch_size}")
    print(f"{'model':<24}{'cos fp16/fp32':>14}{'C*r_d':>8}{'r_m':>8}{'T':>8}{'E':>6}{'T nvjpeg':>10}{'E nvjpeg':>9}")
    for r in rows:
        print(f"{r['model']:<24}{r['fp16_vs_fp32_min_cosine']:>14.5f}{r['cores'] * r['r_d_per_core']:>8.0f}"
              f"{r['r_m']:>8.0f}{r['T']:>8.0f}{r['E']:>6.2f}{r['T_nvjpeg']:>10.0f}{r['E_nvjpeg']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
