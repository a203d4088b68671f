"""Continue training from a shipped ONNX model: rebuild PyTorch weights with BatchNorm unfolded.

Checkpoints are not shipped (only the ONNX files are), so a later session that wants to train a
shipped model further starts from its ONNX file. The export folds each BatchNorm into the
convolution before it; loading those weights back with an identity BatchNorm gives a network
whose eval-mode output equals the ONNX model's. Training uses batch statistics, though, and an
identity BatchNorm would then rescale every layer to unit variance. `calibrate_batchnorm`
measures each layer's pre-normalisation mean and variance on training batches and sets the
BatchNorm so that eval output stays exactly the same and train-mode output nearly the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from export.unet import UNet3D

Layers = dict[str, tuple[np.ndarray, np.ndarray]]
"""Module name (as in the PyTorch model) -> a convolution's folded (weight, bias)."""


def folded_layers(path: Path) -> Layers:
    """Module name (as in the PyTorch model) -> (weight, bias) for every Conv/ConvTranspose."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers: Layers = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        # torch.onnx names nodes after the module path: "/down.1/down.1.3/Conv" -> "down.1.3"
        parts = node.name.strip("/").split("/")
        if len(parts) < 2 or len(node.input) < 3 or node.input[1] not in inits:
            raise ValueError(f"`{path.name}` node {node.name!r} is not a folded export layer")
        layers[parts[-2]] = (inits[node.input[1]].copy(), inits[node.input[2]].copy())
    return layers


def load_folded(model: UNet3D, path: str | Path) -> int:
    """Load an exported model's folded weights into `model` (BatchNorm set to identity plus the
    folded bias). Returns the number of layers loaded; raises ValueError on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`init_from` must be an ONNX file, got {str(path)!r}")
    return load_layers(model, folded_layers(path), path.name)


def load_layers(model: UNet3D, layers: Layers, label: str) -> int:
    """Load folded (weight, bias) pairs by module name, as `load_folded` does for a file."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    if sorted(convs) != sorted(layers):
        raise ValueError(f"`{label}` has layers {sorted(layers)}, the network {sorted(convs)}: "
                         "train with the architecture in its manifest")
    with torch.no_grad():
        for name in convs:
            conv, (weight, bias) = modules[name], layers[name]
            if tuple(conv.weight.shape) != weight.shape:
                raise ValueError(f"`{label}` layer {name} has shape {weight.shape}, the network "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(weight))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(bias))
                continue
            bn = _batchnorm_after(modules, name)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(var + eps) == x
    return len(convs)


def _batchnorm_after(modules: dict[str, nn.Module], conv_name: str) -> nn.BatchNorm3d:
    block, _, index = conv_name.rpartition(".")
    bn = modules.get(f"{block}.{int(index) + 1}")
    if not isinstance(bn, nn.BatchNorm3d):
        raise ValueError(f"layer {conv_name} has no bias and no BatchNorm after it")
    return bn


@torch.no_grad()
def calibrate_batchnorm(model: UNet3D, x: torch.Tensor) -> None:
    """Give every BatchNorm the statistics of its input on batch `x` without changing the eval
    output: with running mean m and variance v, weight sqrt(v + eps) and bias b + m, eval mode
    computes (x - m) / sqrt(v + eps) * sqrt(v + eps) + b + m = x + b, as before."""
    stats: dict[nn.BatchNorm3d, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        t = inputs[0].double()
        stats[module] = (t.mean(dim=(0, 2, 3, 4)), t.var(dim=(0, 2, 3, 4), unbiased=False))

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    hooks = [bn.register_forward_pre_hook(record) for bn in bns]
    was_training = model.training
    try:
        model.eval()  # identity-equivalent BatchNorm: each layer sees what the ONNX model computes
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for bn in bns:
        mean, var = stats[bn]
        bias = bn.bias.double() - bn.running_mean.double() * bn.weight.double() / torch.sqrt(
            bn.running_var.double() + bn.eps)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(bias + mean)
