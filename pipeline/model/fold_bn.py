"""Batch norms folded into the convolution before them, for ``--compile aot``: AOTInductor's freezing keeps each
batch norm of an exported graph as a kernel of its own after its convolution, with the ReLU after it, where
``torch.compile``'s freezing folds them into the convolution (README, Performance: the rates)."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the batch norm takes only that convolution's output, from an fx trace;
    none where the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001  (control flow fx cannot trace: nothing is folded)
        log.info("batch norms not folded: the model cannot be traced by torch.fx (%s)", type(e).__name__)
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d) or not node.args:
            continue
        prev = node.args[0]
        if (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules.get(prev.target), nn.Conv2d)):
            pairs.append((prev.target, node.target))
    return pairs


def fold_batch_norms(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) with each batch norm that follows a convolution alone folded into its
    weights and replaced by ``nn.Identity``, and how many were folded; ``model`` itself unchanged."""
    pairs = conv_bn_pairs(model)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
            conv.weight, conv.bias = fused.weight, fused.bias
            parent, _, leaf = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
    return folded, len(pairs)
