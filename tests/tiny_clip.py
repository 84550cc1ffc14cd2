"""The tiny image-text model of the CLIP tests: an open_clip architecture config small enough for 2 CPUs (a ViT of 2
layers, width 64, 32 px; a text transformer of 2 layers, width 64, open_clip's own BPE vocabulary, 77 tokens),
with random weights saved to a checkpoint file, so that ``open_clip:Tiny-CLIP-Test --weights FILE`` exercises
the checkpoint path. Nothing is downloaded.

:func:`install` writes the config and the checkpoint, and points ``EMBEDPIPE_OPEN_CLIP_CONFIGS`` at the config,
for this process and the processes it starts (``embedpipe serve``, CLI runs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCH = "Tiny-CLIP-Test"
SPEC = f"open_clip:{ARCH}"
CONFIG = {"embed_dim": 48,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
ENV = "EMBEDPIPE_OPEN_CLIP_CONFIGS"


@dataclass(frozen=True)
class TinyClip:
    spec: str
    weights: Path  # the random checkpoint (state dict)
    config: Path

    def options(self, **changes: Any) -> dict[str, Any]:
        """The embed options of the tiny CLIP (the tiny test model's, tests/tiny.py, with this model)."""
        import tiny

        return tiny.options(model=self.spec, weights=str(self.weights), input_size=None, **changes)

    def cli_args(self, **changes: Any) -> list[str]:
        import tiny

        return tiny.cli_args(model=self.spec, weights=str(self.weights), input_size=None, **changes)

    def reference(self) -> Any:
        """open_clip's own model with the checkpoint's weights, for comparing with (eval mode)."""
        import open_clip
        import torch

        model = open_clip.create_model(ARCH, pretrained=None)
        model.load_state_dict(torch.load(self.weights, weights_only=True))
        return model.eval()


    def text_embeddings(self, texts: list[str]) -> Any:
        """open_clip's own normalised text embeddings of ``texts`` (float32 numpy ``[N, D]``)."""
        import open_clip
        import torch

        with torch.no_grad():
            return self.reference().encode_text(open_clip.get_tokenizer(ARCH)(texts), normalize=True).numpy()

    def exact_neighbours(self, emb_dir: Path, texts: list[str], k: int) -> list[list[str]]:
        """The keys of the ``k`` rows of ``emb_dir`` nearest each text, by exact search over open_clip's own text
        embedding (what every text query path must answer)."""
        import numpy as np

        from pipeline import store

        rows = store.read_all(emb_dir)
        scores = self.text_embeddings(texts) @ rows.embeddings.astype(np.float32).T
        return [[rows.keys[i] for i in np.argsort(-s, kind="stable")[:k]] for s in scores]


def install(folder: Path) -> TinyClip:
    """Write the config and a seeded random checkpoint under ``folder``; register the config (env and open_clip)."""
    import open_clip
    import torch

    from pipeline.model.sources import open_clip as source

    config = folder / f"{ARCH}.json"
    config.write_text(json.dumps(CONFIG))
    paths = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    os.environ[ENV] = os.pathsep.join([*paths, str(config)])
    source._library.cache_clear()
    source.model_names.cache_clear()
    open_clip.add_model_config(config)
    torch.manual_seed(1)  # other weights than the source's own seeded "none"
    weights = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model(ARCH, pretrained=None).state_dict(), weights)
    return TinyClip(SPEC, weights, config)
