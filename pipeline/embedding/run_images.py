"""A few of a run's own images, decoded and cropped as the embed stage does: the real input that measured choices
(``--precision auto``'s fidelity check) are made on."""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from ..model.decoders.cpu import decode_one
from ..model.image_header import SkipSample
from ..model.preprocess import Preprocess
from .tar import IMAGE_EXTS, iter_tar_samples

log = logging.getLogger(__name__)


def run_images(urls: Iterable[str], pre: Preprocess, limit: int = 16) -> torch.Tensor | None:
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
