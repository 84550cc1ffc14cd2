"""Batch norms folded into their convolutions for ``--compile aot`` (issue 28, item 3): the same features, fewer
layers, the backbone itself untouched; a model torch.fx cannot trace is left as it is."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.model.backbones import load_backbone
from pipeline.model.fold_bn import fold_batch_norms


def test_a_resnets_batch_norms_fold_into_its_convolutions_with_the_same_features():
    bb = load_backbone("torchvision:resnet18", "none")
    folded, n = fold_batch_norms(bb.model)
    norms = [m for m in bb.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert n == len(norms) == 20  # every batch norm of resnet18 follows a convolution alone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bb.model.modules()) == 20  # the backbone is unchanged
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(folded(x), bb.model(x))
    assert cos.min() > 0.99999


class Branching(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_a_model_fx_cannot_trace_is_not_folded():
    model = Branching().eval()
    folded, n = fold_batch_norms(model)
    assert n == 0 and folded is model


def test_a_batch_norm_whose_convolution_feeds_another_layer_too_stays():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.bn(h) + h  # folding would change the second use of h

    model = Shared().eval()
    folded, n = fold_batch_norms(model)
    assert n == 0 and isinstance(folded.bn, nn.BatchNorm2d)
