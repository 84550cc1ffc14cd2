"""`embedpipe bench`: decode, model, write and end-to-end rates measured side by side, against a tutorial baseline."""
from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .model.backbones import Backbone, load_backbone
from .model.compile import Extractor, build_extractor
from .model.specs import DEFAULT_MODEL
from .threads import usable_cpus

log = logging.getLogger(__name__)


def _jpeg_in_size_range(img: Any, rng: np.random.Generator, low: int = 40_000, high: int = 120_000) -> bytes:
    """JPEG bytes of ``img`` between ``low`` and ``high``: smooth photos get sensor-like grain, busy ones less quality."""
    from PIL import Image

    quality, grain = int(rng.integers(85, 97)), 0.0
    pixels = np.asarray(img, dtype=np.float32)
    for _ in range(12):
        noisy = pixels + rng.normal(0, grain, pixels.shape) if grain else pixels
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        if len(buf.getvalue()) < low:
            grain += 4.0
        elif len(buf.getvalue()) > high:
            quality -= 6
        else:
            break
    return buf.getvalue()


def bench_photo(photo: Any, rng: np.random.Generator) -> Any:
    """One realistic 500x375 image from a sample photo: a random 60-100% crop, resized, flipped half the time."""
    from PIL import Image

    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def make_bench_shards(out: Path, n: int, shard_size: int = 128, seed: int = 0) -> list[Path]:
    """Realistic shards: 500x375 JPEGs of 40-120 KB cut from real photos with varied crops and qualities."""
    from .sample_data import PHOTOS, load_photo

    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in PHOTOS]
    photos = [p for p in photos if min(p.size) >= 300]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    import tarfile

    for s in range(0, n, shard_size):
        path = out / f"bench-{s // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + shard_size)):
                img = bench_photo(photos[i % len(photos)], rng)
                for ext, data in (("jpg", _jpeg_in_size_range(img, rng)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"img{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    """Items per second of ``fn`` (which returns how many items it processed), repeated for ``min_seconds``."""
    done, t0 = 0, time.perf_counter()
    while True:
        done += fn()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return done / dt


def decode_rate(urls: list[str], bb: Backbone, limit: int) -> tuple[float, float, torch.Tensor]:
    """``r_d``: the embed stage's own decode + resize + crop path in this process, per core: measured with
    every core decoding at once (one thread each, as the embed stage runs it), and with one thread alone.

    The first is what ``C * r_d`` in the bound means, a machine's decode rate: cores decoding together share
    caches and memory, so one thread's rate times C can be a bound no program reaches (README, Performance).
    Both are reported.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .embedding.tar import iter_tar_samples
    from .model.decoders.cpu import decode_one

    raw = [s["jpg"] for u in urls for s in iter_tar_samples(u)][:limit]
    pre = bb.preprocess

    def one(data: bytes) -> torch.Tensor:
        return decode_one(data, pre)

    C = usable_cpus()
    with ThreadPoolExecutor(C, thread_name_prefix="decode") as pool:
        list(pool.map(one, raw[: 2 * C]))  # threads started
        t0 = time.perf_counter()
        imgs = list(pool.map(one, raw))
        per_core_all = len(raw) / (time.perf_counter() - t0) / C
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for d in raw:
            one(d)
        single = len(raw) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return per_core_all, single, torch.stack(imgs)


def model_rate(bb: Backbone, batch: torch.Tensor, precision: str, compile: str, cache_dir: str,
               min_seconds: float, micro_batch: int | None = None) -> tuple[float, float, Extractor]:
    """``r_m``: model-only images/s on pre-decoded uint8 batches, all threads; the build time; the extractor."""
    t0 = time.perf_counter()
    ex = build_extractor(bb, "cpu", precision, compile, cache_dir, micro_batch=micro_batch)
    ex(batch)  # warm-up (and the compile, for inductor)
    build = time.perf_counter() - t0
    return batch_rate(ex, batch, min_seconds), build, ex


def batch_rate(ex: Extractor, batch: torch.Tensor, min_seconds: float) -> float:
    return _rate(lambda: (ex(batch), len(batch))[1], min_seconds)


def write_rate(dim: int, dtype: str, rows: int = 20000) -> float:
    """``r_w``: rows/s of Parquet embedding shards written the way the embed stage writes them."""
    from . import store

    emb = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    keys = [f"k{i:08d}" for i in range(rows)]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        table = store.embedding_table(keys, "s", range(rows), [0] * rows, emb, dtype)
        store.write_table(Path(d) / "x.parquet", table)
        return rows / (time.perf_counter() - t0)


def flops_per_image(bb: Backbone) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, bb.preprocess.input_size, bb.preprocess.input_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        bb.model(x)
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, min_seconds: float = 1.0) -> float:
    """Measured matrix-multiply FLOP/s of ``dtype`` on this process's threads: the best of three sizes.

    The best, not one size, so that the peak is not understated (which would flatter the model's share).
    """
    rates = []
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        rates.append(2 * n**3 * _rate(lambda: (torch.mm(a, b), 1)[1], min_seconds / 3))
    return max(rates)


def baseline(urls: list[str], spec: str, weights: str, batch_size: int = 32,
             limit: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """The loop a tutorial would write: webdataset + PIL + torchvision transforms + eager fp32, fc = Identity.

    The model is loaded again, as its source gives features (the head replaced by Identity, or reset), so the
    baseline differs from ours in the loop only.
    """
    import torchvision.transforms as T
    import webdataset as wds

    bb = load_backbone(spec, weights)
    model, pre = bb.model, bb.preprocess
    tf = T.Compose([T.Resize(pre.resize_size, interpolation=T.InterpolationMode(pre.interpolation)),
                    T.CenterCrop(pre.input_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg")
    ds = ds.map_tuple(lambda k: k, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for keys, x in loader:
            for k, e in zip(keys, torch.nn.functional.normalize(model(x), dim=1).numpy()):
                out[k] = e
            if limit and len(out) >= limit:
                break
    return len(out) / (time.perf_counter() - t0), out


def end_to_end(urls: list[str], out: Path, **opts: Any) -> tuple[float, dict[str, np.ndarray]]:
    """``T``: ``embedpipe embed`` itself, shards -> Parquet, timed by its own summary (model already cached)."""
    from . import store
    from .embedding.runner import embed

    summary = embed([str(u) for u in urls], out, quiet=True, overwrite=True, **opts)
    b = store.read_all(out)
    return summary.images_per_s, dict(zip(b.keys, b.embeddings))


def _cos(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    keys = sorted(set(a) & set(b))
    return float(min(np.dot(a[k], b[k]) / (np.linalg.norm(a[k]) * np.linalg.norm(b[k])) for k in keys))


def run_bench(model: str = DEFAULT_MODEL, weights: str = "default", quick: bool = False, workdir: str | None = None,
              precision: str = "auto", compile: str = "auto", batch_size: int = 64,
              workers: int | None = None, micro_batch: int | None = None,
              modes: list[tuple[str, str]] | None = None, images: int | None = None) -> dict[str, Any]:
    """Measure r_d, r_m, r_w, T, the bound T*, E = T/T*, the tutorial baseline and model FLOP/s vs matmul peak.

    Everything is measured in one run, side by side, because these machines are shared and noisy.
    """
    C = usable_cpus()
    n_images = images or (384 if quick else 1536)
    secs = 1.5 if quick else 5.0
    tmp = Path(workdir or tempfile.mkdtemp(prefix="embedpipe-bench-"))
    urls = [str(p) for p in make_bench_shards(tmp / "shards", n_images, shard_size=n_images // 2)]
    from .embedding.tar import iter_tar_samples

    sizes = [len(s["jpg"]) for u in urls for s in iter_tar_samples(u)]
    bb = load_backbone(model, weights)
    cache = str(tmp / "cache")
    r_d, r_d_one, batch = decode_rate(urls, bb, 256 if quick else 512)
    batch = batch[:batch_size] if len(batch) >= batch_size else batch
    if modes is None and quick:  # the reference, and the candidates for the fastest mode (inductor fp32 never is)
        modes = [("eager", "fp32"), ("torchscript", "fp32"), ("torchscript", "bf16"), ("inductor", "bf16")]
    elif modes is None:
        modes = [(c, p) for c in ("eager", "torchscript", "inductor") for p in ("fp32", "bf16")] + [("aot", "bf16")]
    flops = flops_per_image(bb)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, min_seconds=secs / 2)
             for p in ("fp32", "bf16")}
    model_rows, built = [], {}

    def row(comp: str, prec: str, rate: float, build: float, micro: int, **extra: Any) -> dict[str, Any]:
        return {"compile": comp, "precision": prec, "images_per_s": rate, "build_s": build, "micro_batch": micro,
                "flops_per_s": rate * flops, "peak_fraction": rate * flops / peaks[prec], **extra}

    for comp, prec in modes:
        try:
            rate, build, ex = model_rate(bb, batch, prec, comp, cache, secs, micro_batch)
        except Exception as e:  # a mode that cannot run here is reported, not fatal
            log.warning("model mode %s/%s failed: %s", comp, prec, e)
            continue
        built[comp, prec] = ex
        model_rows.append(row(comp, prec, rate, build, ex.micro_batch))
    fastest = max(model_rows, key=lambda r: r["images_per_s"])
    compile_auto = auto_choice(model_rows, n_images)
    if compile == "auto":  # T is measured in the fastest mode unless one is asked for
        compile = fastest["compile"] if precision == "auto" else max(
            (r for r in model_rows if r["precision"] == precision), key=lambda r: r["images_per_s"])["compile"]
    if precision == "auto":
        precision = max((r for r in model_rows if r["compile"] == compile), key=lambda r: r["images_per_s"])["precision"]
    if micro_batch != 0:  # the same TorchScript fp32 model on the whole batch at once: what micro-batching buys
        rate, build, _ = model_rate(bb, batch, "fp32", "torchscript", cache, secs, 0)
        model_rows.append(row("torchscript", "fp32", rate, build, 0, whole_batch=True))
    r_w = write_rate(bb.num_features, "float16")
    opts = dict(model=model, weights=weights, precision=precision, compile=compile, batch_size=batch_size,
                micro_batch=micro_batch, workers=workers, cache_dir=cache, device="cpu")
    if (compile, precision) not in built:  # fills the compile cache, so T measures the steady state
        built[compile, precision] = model_rate(bb, batch, precision, compile, cache, secs, micro_batch)[2]
    ex = built[compile, precision]
    # r_m and T alternate, twice, so a burst of load from other processes hits both alike; each is the best of
    # its two measurements (the least disturbed), the same statistic for both sides of E = T/T*.
    r_ms, Ts = [], []
    for rep in range(2):
        r_ms.append(batch_rate(ex, batch, secs))
        T_rep, ours = end_to_end(urls, tmp / f"out{rep}", **opts)
        Ts.append(T_rep)
    r_m, T = max(r_ms), max(Ts)
    micro = ex.micro_batch
    T_base, base = baseline(urls, model, weights, limit=96 if quick else None)
    T_star = 1.0 / (1.0 / (C * r_d) + 1.0 / r_m + 1.0 / r_w)
    return {
        "machine": {"cores": C, "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "setup": {"model": bb.spec, "images": n_images, "jpeg_kb_mean": float(np.mean(sizes)) / 1024,
                  "jpeg_kb_range": [min(sizes) / 1024, max(sizes) / 1024], "compile": compile, "precision": precision,
                  "batch_size": batch_size, "micro_batch": micro, "quick": quick, "model_gflops_per_image": flops / 1e9},
        "r_d_per_core": r_d, "r_d_one_core_alone": r_d_one, "r_m": r_m, "r_w": r_w, "T": T, "T_star": T_star,
        "E": T / T_star, "E_if_decode_scaled_linearly": T * (1 / (C * r_d_one) + 1 / r_m + 1 / r_w),
        "T_baseline": T_base, "speedup": T / T_base, "cosine_to_baseline_min": _cos(ours, base),
        "matmul_peak_flops": peaks, "model_modes": model_rows,
        "fastest_mode": {k: fastest[k] for k in ("compile", "precision", "images_per_s", "peak_fraction")},
        "compile_auto": compile_auto,
    }


def auto_choice(rows: list[dict[str, Any]], images: int) -> dict[str, Any] | None:
    """What embed's ``--compile auto`` takes for ``images`` from these measured rows, per precision: the least
    setup + images / rate among its candidates (``model/tuning.py``), the build time standing for the setup."""
    from .model.tuning import CPU_COMPILE_CANDIDATES, expected_seconds

    out: dict[str, Any] = {}
    for prec in sorted({r["precision"] for r in rows}):
        times = {r["compile"]: expected_seconds({"setup_s": r["build_s"], "rate": r["images_per_s"]}, images)
                 for r in rows if r["precision"] == prec and r["compile"] in CPU_COMPILE_CANDIDATES
                 and not r.get("whole_batch")}
        if times:
            out[prec] = {"mode": min(times, key=times.get), "expected_s": times}
    return {"images": images, "by_precision": out} if out else None


def format_report(r: dict[str, Any]) -> str:
    s = r["setup"]
    lines = [
        f"embedpipe bench: {s['model']} ({s['model_gflops_per_image']:.2f} GFLOP/img), {r['machine']['cores']} cores, "
        f"{s['images']} JPEGs of {s['jpeg_kb_mean']:.0f} KB mean, {s['compile']}/{s['precision']}, batch {s['batch_size']} (model calls of "
        f"{s['micro_batch'] or s['batch_size']})",
        f"  r_d  decode+resize+crop per core  {r['r_d_per_core']:8.1f} img/s   (all cores decoding; one core alone "
        f"{r['r_d_one_core_alone']:.1f})",
        f"  r_m  model only (all cores)       {r['r_m']:8.1f} img/s",
        f"  r_w  Parquet write                {r['r_w']:8.0f} rows/s",
        f"  T    end to end (embed)           {r['T']:8.1f} img/s",
        f"  T*   bound 1/(1/(C r_d)+1/r_m+1/r_w) {r['T_star']:5.1f} img/s   E = T/T* = {r['E']:.2f}"
        f"   (with C x one core alone: {r['E_if_decode_scaled_linearly']:.2f})",
        f"  baseline (tutorial loop)          {r['T_baseline']:8.1f} img/s   speedup T/T_base = {r['speedup']:.2f}x"
        f"   (min cosine to baseline {r['cosine_to_baseline_min']:.4f})",
        "  model modes:        img/s   GFLOP/s  of matmul peak   build s   images per call",
    ]
    for m in r["model_modes"]:
        lines.append(f"    {m['compile']:<11} {m['precision']:<5} {m['images_per_s']:7.1f} {m['flops_per_s'] / 1e9:9.1f}"
                     f"  {100 * m['peak_fraction']:6.1f}%          {m['build_s']:6.1f}   {m['micro_batch'] or 'all'}")
    lines.append("  matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in r["matmul_peak_flops"].items()))
    auto = r.get("compile_auto")
    for prec, c in ((auto or {}).get("by_precision") or {}).items():
        lines.append(f"  --compile auto for {auto['images']} images in {prec}: {c['mode']} (expected "
                     + ", ".join(f"{m} {t:.0f} s" for m, t in c["expected_s"].items()) + ")")
    return "\n".join(lines)
