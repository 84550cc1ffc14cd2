"""`embedpipe models`: known aliases, and for one spec its dimension, preprocessing and size."""
from __future__ import annotations

import json

import click

from .group import cli


@cli.command()
@click.argument("spec", required=False)
@click.option("--weights", default=None, help="Weights to describe, as embed's --weights (default: embed's own, the "
              "embedded weights where a package ships them; a model whose default weights are a download is described "
              "with random ones, which have the same preprocessing).")
@click.option("--layer", default=None, help="Describe the pooled output of this graph node instead.")
@click.option("--nodes", is_flag=True, help="List the graph node names usable with --layer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(spec: str | None, weights: str | None, layer: str | None, nodes: bool, as_json: bool) -> None:
    """List model aliases, or describe one model spec (dim, preprocessing, parameters)."""
    from ..model.backbones import load_backbone
    from ..model.sources import all_sources, resolve_spec
    from ..model.specs import ALIASES, DEFAULT_MODEL, EMBEDDED_WEIGHTS

    if spec is None:
        listed = all_sources()
        bare = ", then ".join(s.name for s in listed if s.bare_order is not None)
        click.echo(f"Model specs (a bare name is looked up in {bare}):")
        width = max(20, *(len(f"{s.name}:{s.argument}") for s in listed))
        for source in listed:
            click.echo(f"  {source.name + ':' + source.argument:<{width}} {source.about}")
        click.echo(f"Default: {DEFAULT_MODEL} (ImageNet weights embedded, works offline)\nAliases:")
        for alias, target in ALIASES.items():
            note = " (embedded weights)" if target in EMBEDDED_WEIGHTS else ""
            click.echo(f"  {alias:<20} {target}{note}")
        return
    if nodes:
        from torchvision.models.feature_extraction import get_graph_node_names

        kind, name = resolve_spec(spec)
        bb = load_backbone(f"{kind}:{name}", weights="none")
        for n in get_graph_node_names(bb.model)[1]:
            click.echo(n)
        return
    if weights is None:  # what embed loads by default, without a download
        from ..embedding.options import EmbedConfig
        from ..model.weights import embedded_weights_path

        kind, name = resolve_spec(spec)
        weights = EmbedConfig.weights if embedded_weights_path(f"{kind}:{name}") is not None else "none"
    info = load_backbone(spec, weights=weights, layer=layer).describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    pre = info["preprocess"]
    click.echo(f"{info['model']}: dim {info['dim']}, {info['parameters'] / 1e6:.2f}M parameters, weights {info['weights']}")
    click.echo(f"  input {pre['input_size']}px (resize {pre['resize_size']}, {pre['interpolation']}), "
               f"mean {pre['mean']}, std {pre['std']}" + (f", layer {info['layer']}" if info["layer"] else ""))
