"""Average the weights of several fine-tunes of one model ("model soup", Wortsman et al. 2022).

    python -m export.soup --out out/soup/opacity.pt appliance/models/opacity.onnx \
        out/checkpoints/opacity_v5/opacity.pt [--coefficients 0.5,0.5]

Continuations that start from the same shipped model with small learning rates stay in one basin
of the loss, so the average of their weights is a working model of its own, and in the paper's
experiments often a better one than each of them (for this project's CPU continuations it was
not: MODEL_CARD.md). The average costs nothing at run time (same network, same size).
Ingredients are shipped ONNX files (their architecture comes from the manifest beside them) or
`export.train` weights (.pt); every ingredient is reduced to its BatchNorm-folded convolutions,
which is what the runtime computes, and those are averaged. The output is a weights file that
`python -m export.onnx --weights` exports and checks like any other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx import export_onnx, load_model, sha256_of
from export.train import describe_model_file
from export.unet import UNet3D, UNetConfig, count_parameters
from export.unfold import Layers, folded_layers, load_layers


@dataclass(frozen=True)
class Ingredient:
    path: Path
    stage: str
    config: UNetConfig
    layers: Layers
    label: str  # file, version or step, and the start of its digest: for the manifest


def _manifest_entry_for(onnx_path: Path) -> dict[str, Any]:
    manifest = onnx_path.parent / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"`{onnx_path}` has no manifest.json beside it to give its architecture")
    try:
        models = json.loads(manifest.read_text()).get("models", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{manifest} is not a models manifest ({e})") from None
    for entry in models.values():
        if entry.get("file") == onnx_path.name and "architecture" in entry:
            return entry
    raise ValueError(f"{manifest} has no entry for `{onnx_path.name}`")


def read_ingredient(path: str | Path) -> Ingredient:
    """A shipped ONNX file or an export.train weights file, as folded layers."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ingredient `{path}` is not a file")
    if path.suffix == ".onnx":
        entry = _manifest_entry_for(path)
        try:
            layers = folded_layers(path)
        except Exception as e:  # protobuf decode errors: not an ONNX file
            raise ValueError(f"`{path}` is not an exported ONNX model ({e})") from None
        config = UNetConfig.from_dict(entry["architecture"])
        return Ingredient(path, entry["name"], config, layers, describe_model_file(path))
    stage, model, training, _ = load_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        # fold exactly as the shipped export does, so every ingredient is in the same form; the
        # smallest tile the network accepts will do (folding does not depend on the tile shape)
        tile = (model.config.divisor,) * 3
        onnx_path = export_onnx(model, tile, Path(tmp) / "ingredient.onnx")
        layers = folded_layers(onnx_path)
    return Ingredient(path, stage, model.config, layers,
                      f"{path.parent.name}/{path.name} step {training.get('steps')} (sha256 {sha256_of(path)[:12]})")


def average(ingredients: list[Ingredient], coefficients: list[float]) -> Layers:
    """The coefficient-weighted mean of every layer's folded weight and bias."""
    if len(ingredients) < 2:
        raise ValueError("a soup needs at least two ingredients")
    if len(coefficients) != len(ingredients) or min(coefficients) < 0 or sum(coefficients) <= 0:
        raise ValueError(f"`coefficients` must be {len(ingredients)} non-negative numbers, got {coefficients}")
    first = ingredients[0]
    for other in ingredients[1:]:
        if other.stage != first.stage:
            raise ValueError(f"`{other.path}` is the {other.stage} stage, `{first.path}` the {first.stage} stage")
        if other.config != first.config:
            raise ValueError(f"`{other.path}` is another network than `{first.path}`: "
                             f"{other.config.to_dict()} vs {first.config.to_dict()}")
        if sorted(other.layers) != sorted(first.layers):
            raise ValueError(f"`{other.path}` and `{first.path}` have different layers")
    w = np.asarray(coefficients, dtype=np.float64) / float(sum(coefficients))
    out: Layers = {}
    for name in first.layers:
        weights = sum(c * ing.layers[name][0].astype(np.float64) for c, ing in zip(w, ingredients, strict=True))
        biases = sum(c * ing.layers[name][1].astype(np.float64) for c, ing in zip(w, ingredients, strict=True))
        out[name] = (weights.astype(np.float32), biases.astype(np.float32))
    return out


def make_soup(paths: list[str | Path], coefficients: list[float] | None, out: str | Path) -> Path:
    """Write an export.train-style weights file holding the average of `paths`."""
    ingredients = [read_ingredient(p) for p in paths]
    coefficients = coefficients or [1.0] * len(ingredients)
    layers = average(ingredients, coefficients)
    model = UNet3D(ingredients[0].config)
    load_layers(model, layers, "soup")
    model.eval()
    total = float(sum(coefficients))
    training = {
        "method": "weight average (model soup) of continuations of one model, BatchNorm folded",
        "ingredients": [{"model": ing.label, "coefficient": round(c / total, 4)}
                        for ing, c in zip(ingredients, coefficients, strict=True)],
        "parameters": count_parameters(model),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stage": ingredients[0].stage, "unet": ingredients[0].config.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "training": training, "metrics": {}}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.soup", description=__doc__.splitlines()[0])
    p.add_argument("ingredients", nargs="+", help="ONNX files (with their manifest) or export.train .pt files")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--coefficients", default="", help="comma-separated, one per ingredient (default: equal)")
    a = p.parse_args(argv)
    try:
        try:
            coefficients = [float(v) for v in a.coefficients.split(",")] if a.coefficients else None
        except ValueError:
            raise ValueError(f"`coefficients` must be comma-separated numbers, got {a.coefficients!r}") from None
        path = make_soup(a.ingredients, coefficients, a.out)
    except ValueError as e:
        print(f"export.soup: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
