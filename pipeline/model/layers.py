"""Where features come from inside a network: removing the classification head, or pooling one named graph node."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from ..errors import UserError

HEAD_ATTRS = ("fc", "classifier", "heads", "head")


def remove_head(model: nn.Module, spec: str) -> tuple[nn.Module, dict[str, Any]]:
    """Replace the last Linear of the classification head (fc / classifier / heads / head) with Identity."""
    for attr in HEAD_ATTRS:
        head = getattr(model, attr, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, {"attr": attr, "in_features": head.in_features}
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            path, last = linears[-1]
            parent = head.get_submodule(path.rpartition(".")[0]) if "." in path else head
            setattr(parent, path.rpartition(".")[2], nn.Identity())
            return model, {"attr": f"{attr}.{path}", "in_features": last.in_features}
    raise UserError(f"{spec}: cannot find a Linear classification head (fc/classifier/heads/head); use --layer NODE")


class PooledNode(nn.Module):
    """Output of one named graph node, globally average-pooled to ``[B, C]``."""

    def __init__(self, extractor: nn.Module, node: str):
        super().__init__()
        self.extractor = extractor
        self.node = node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.extractor(x)[self.node]
        if y.ndim == 4:
            return y.mean(dim=(2, 3))
        if y.ndim == 3:  # transformer tokens [B, N, C]
            return y.mean(dim=1)
        return y.flatten(1)


def take_layer(model: nn.Module, layer: str, spec: str) -> nn.Module:
    """The pooled output of graph node ``layer`` (``--layer``); a UserError with close names for an unknown one."""
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    _, nodes = get_graph_node_names(model)
    # A module name ("layer3") stands for its last node, as in torchvision's own feature extraction.
    if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
        near = difflib.get_close_matches(layer, nodes, n=5, cutoff=0.3)
        raise UserError(f"{spec} has no node {layer!r}; close names: {', '.join(near) or 'none'} "
                        f"(`embedpipe models {spec} --nodes` lists all {len(nodes)})")
    return PooledNode(create_feature_extractor(model, return_nodes=[layer]), layer)
