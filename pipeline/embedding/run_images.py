"""A run's own images for the choices measured before it: a few decoded and cropped as the embed stage does
(``--precision auto``'s fidelity check), and how many there are (``--compile auto``'s expected time)."""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from ..model.decoders.cpu import decode_one
from ..model.image_header import SkipSample
from ..model.preprocess import Preprocess
from .shards import sample_count
from .tar import IMAGE_EXTS, can_seek, iter_tar_samples

log = logging.getLogger(__name__)


def run_images(urls: Iterable[str], pre: Preprocess, limit: int = 64) -> torch.Tensor | None:
    """Up to ``limit`` images of the first of ``urls`` that holds decodable ones, as uint8 ``[N,3,S,S]`` crops;
    None when none decodes. A bad sample or shard is passed over here: the run itself records it."""
    crops: list[torch.Tensor] = []
    for url in urls:
        try:
            for sample in iter_tar_samples(url):
                data = next((sample[e] for e in IMAGE_EXTS if isinstance(sample.get(e), bytes)), None)
                if data is None:
                    continue
                try:
                    crops.append(decode_one(data, pre))
                except SkipSample:
                    continue
                if len(crops) >= limit:
                    break
        except Exception as e:  # noqa: BLE001  (a shard that cannot be read fails in the run, with its reason)
            log.debug("no images for the measurements from %s: %s", url, e)
        if crops:
            break
    return torch.stack(crops) if crops else None


UNKNOWN_SHARD_IMAGES = 10_000  # a shard that cannot be counted cheaply (remote, compressed): img2dataset's default


def expected_images(urls: list[str]) -> int:
    """About how many images ``urls`` hold: img2dataset's counts where its ``_stats.json`` has them, else the image
    members of the first shard that can be read by seeking (``tar.can_seek``: headers only) for each shard, else :data:`UNKNOWN_SHARD_IMAGES`."""
    import tarfile

    counts = [sample_count(u) for u in urls]
    per_shard: int | None = None
    for url in (u for u, c in zip(urls, counts) if c is None):
        if can_seek(url):
            try:
                with tarfile.open(url) as tar:
                    per_shard = sum(1 for m in tar if m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
                break
            except (OSError, tarfile.TarError):
                continue
    guess = per_shard if per_shard is not None else UNKNOWN_SHARD_IMAGES
    return sum(c if c is not None else guess for c in counts)
