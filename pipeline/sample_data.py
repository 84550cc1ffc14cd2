"""Real-image sample shards (sklearn digits, skimage photos) written as WebDataset tars, for demos and tests."""
from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from . import atomic
from .errors import UserError
from .progress import Progress

log = logging.getLogger(__name__)

DATASETS = ("digits", "photos")
FORMATS = ("jpg", "png", "mixed")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_DIGITS = 1797
# skimage.data images that ship inside the scikit-image wheel (no pooch download). A photo's
# ``photo_index`` is its index here, so append only: never reorder. ("cat" is an alias of "chelsea":
# the same picture, so it is not a second photo.)
PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
    "rocket", "text",
)
# The classes of the photos dataset: each holds several different photos, so that a split keeping every
# variant of a photo on one side (``--group-field photo``) asks a probe to recognise photos it has not seen.
# (With a class per photo, variants of one photo landed on both sides: a meaningless 100%.) The label is the
# index here: append only.
PHOTO_CLASSES = (
    ("portrait", ("astronaut", "camera", "chelsea")),
    ("texture", ("brick", "grass", "gravel")),
    ("biomedical", ("cell", "immunohistochemistry", "retina")),
    ("document", ("page", "text")),
    ("space", ("hubble_deep_field", "moon", "rocket")),
    ("object", ("clock", "coffee", "coins", "colorwheel")),
)
PHOTO_CLASS = {photo: (i, name) for i, (name, photos) in enumerate(PHOTO_CLASSES) for photo in photos}
GROUP_FIELDS = {"photos": "photo"}  # the json field that names the source a sample was cut from, per dataset
TAR_MTIME = 0.0  # fixed member mtime so the same seed gives byte-identical tars

Sample = dict[str, Any]


def count_samples(dataset: str, limit: int | None = None, variants: int = 20) -> int:
    """How many samples ``write_sample_shards`` writes for these options."""
    total = NUM_DIGITS if dataset == "digits" else len(PHOTOS) * variants
    return total if limit is None else min(limit, total)


def write_sample_shards(
    out: str | Path,
    dataset: str = "digits",
    shard_size: int = 500,
    image_size: int = 224,
    limit: int | None = None,
    fmt: str = "jpg",
    variants: int = 20,
    seed: int = 0,
) -> list[Path]:
    """Write a labelled real-image dataset as WebDataset shards ``OUT/<dataset>-000000.tar``, ...

    ``digits``: the 1797 scikit-learn 8x8 digits, upscaled (bicubic) to ``image_size`` RGB, with
    ``.cls`` (the digit) and ``.json`` (``{"label": "seven", "digit": 7, "source_index": i}``).
    ``photos``: ``variants`` augmented crops of each scikit-image sample photo, with ``.cls`` (its
    class's index in ``PHOTO_CLASSES``: several photos each), ``.txt`` (the photo's name) and ``.json``
    (``{"label": "texture", "photo": "brick", "photo_index": 1, "variant": 3}``; ``photo`` is the group
    a split keeps on one side: ``embedpipe probe --group-field photo``). Samples are shuffled with
    ``seed`` so every shard mixes classes; ``limit`` keeps the first N of that order. ``fmt`` is
    ``jpg``, ``png`` or ``mixed`` (a seeded choice per sample). Each shard is written to a temporary
    name and renamed into place, so a crash never leaves a partial tar under a final name.

    Example:
        >>> write_sample_shards("data/digits", shard_size=500)  # doctest: +SKIP
        [PosixPath('data/digits/digits-000000.tar'), ..., PosixPath('data/digits/digits-000003.tar')]
    """
    _validate(dataset, shard_size, image_size, limit, fmt, variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = count_samples(dataset, limit, variants)
    if dataset == "digits":
        samples = _digit_samples(image_size, fmt, seed, limit)
    else:
        samples = _photo_samples(image_size, fmt, seed, limit, variants)
    paths: list[Path] = []
    with Progress(log, f"sample-data {dataset}", total=total, unit="img") as bar:
        for i, chunk in enumerate(_chunks(samples, shard_size)):
            path = out / f"{dataset}-{i:06d}.tar"
            _write_tar_atomic(path, chunk)
            paths.append(path)
            bar.update(len(chunk))
    stale = sorted(set(out.glob(f"{dataset}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) - set(paths))
    if stale:
        log.warning("%s also holds %d %s shard(s) this run did not write (e.g. %s); remove them before using "
                    "a glob over the directory", out, len(stale), dataset, stale[0].name)
    return paths


def _validate(dataset: str, shard_size: int, image_size: int, limit: int | None, fmt: str, variants: int) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if fmt not in FORMATS:
        raise UserError(f"unknown image format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1 sample, got {shard_size}")
    if not 8 <= image_size <= 4096:
        raise UserError(f"image size must be between 8 and 4096 pixels, got {image_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 sample (or omitted for all), got {limit}")
    if dataset == "photos" and variants < 1:
        raise UserError(f"variants must be at least 1 per photo, got {variants}")


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_tar_atomic(path: Path, samples: list[Sample]) -> None:
    """Write ``samples`` as a tar shard that is complete or absent (``atomic.replacing``)."""
    from webdataset import TarWriter  # imports torch: only when shards are written

    with atomic.replacing(path) as tmp, open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=TAR_MTIME) as w:
        for s in samples:
            w.write(s)


def _encode(img: Image.Image, ext: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _pick_ext(fmt: str, rng: np.random.Generator) -> str:
    return fmt if fmt != "mixed" else ("jpg", "png")[int(rng.integers(2))]


def _digit_samples(image_size: int, fmt: str, seed: int, limit: int | None) -> Iterator[Sample]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn: pip install 'embedpipe[sample]'") from None
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    if limit is not None:
        order = order[:limit]
    for i in order:
        i = int(i)
        digit = int(digits.target[i])
        # 0..16 ink -> dark ink on white paper, 0..255, then a smooth upscale to a natural-looking picture.
        pixels = (255 - np.round(digits.images[i] * (255 / 16))).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        ext = _pick_ext(fmt, np.random.default_rng([seed, i]))
        meta = {"label": DIGIT_NAMES[digit], "digit": digit, "source_index": i}
        yield {
            "__key__": f"digits_{i:06d}",
            ext: _encode(img, ext, quality=95),
            "cls": str(digit).encode("ascii"),
            "json": json.dumps(meta).encode("utf-8"),
        }


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    """One skimage sample photo as an RGB PIL image (grayscale ones are replicated to 3 channels)."""
    try:
        import skimage.data
    except ImportError:
        raise UserError("the photos dataset needs scikit-image: pip install 'embedpipe[sample]'") from None
    if name not in PHOTOS:
        raise UserError(f"unknown photo {name!r}; valid photos: {', '.join(PHOTOS)}")
    try:
        arr = getattr(skimage.data, name)()
    except (ImportError, OSError, ValueError) as e:
        raise UserError(f"skimage.data.{name}() did not load offline ({e}); is scikit-image installed whole?") from None
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def augment(photo: Image.Image, image_size: int, rng: np.random.Generator, plain: bool = False) -> Image.Image:
    """A seeded random variant of ``photo``: rotation (±15°), crop, flip and colour jitter, resized square.

    ``plain`` gives the unaugmented centre square instead (variant 0 of each photo).
    """
    w, h = photo.size
    # Work at about twice the output size: cheaper, and no quality loss after the final resize.
    scale = min(1.0, 2 * image_size / min(w, h))
    if scale < 1.0:
        photo = photo.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        w, h = photo.size
    if plain:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return photo.crop(box).resize((image_size, image_size), Image.BICUBIC)
    angle = float(rng.uniform(-15, 15))
    photo = photo.rotate(angle, resample=Image.BICUBIC, expand=False)
    # Stay inside the rotated image's valid region: shrink the usable box by the rotation's corner loss.
    c, s = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
    usable = min(w, h) / (c + s)
    side = int(usable * float(rng.uniform(0.55, 1.0)))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, int(side * np.sqrt(aspect))), min(h, int(side / np.sqrt(aspect)))
    x0 = (w - usable) / 2 + float(rng.uniform(0, max(usable - cw, 0)))
    y0 = (h - usable) / 2 + float(rng.uniform(0, max(usable - ch, 0)))
    x0, y0 = int(max(0, min(x0, w - cw))), int(max(0, min(y0, h - ch)))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((image_size, image_size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img


def _photo_samples(image_size: int, fmt: str, seed: int, limit: int | None, variants: int) -> Iterator[Sample]:
    pairs = [(p, v) for p in range(len(PHOTOS)) for v in range(variants)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    if limit is not None:
        order = order[:limit]
    for j in order:
        index, variant = pairs[int(j)]
        name = PHOTOS[index]
        label, class_name = PHOTO_CLASS[name]
        rng = np.random.default_rng([seed, index, variant])  # independent of order and limit
        img = augment(load_photo(name), image_size, rng, plain=variant == 0)
        ext = _pick_ext(fmt, rng)
        quality = int(rng.integers(60, 96))
        meta = {"label": class_name, "photo": name, "photo_index": index, "variant": variant}
        if ext == "jpg":
            meta["jpeg_quality"] = quality
        yield {
            "__key__": f"photos_{name}_{variant:04d}",
            ext: _encode(img, ext, quality=quality),
            "cls": str(label).encode("ascii"),
            "txt": name.encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8"),
        }
