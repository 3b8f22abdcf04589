"""Weight-sharing supernet (PSViT-style family), subnet extraction, supernet training and evaluation.

- ``Supernet(space)``: every weight at the space's largest size; ``net(x, arch)`` runs any member.
- ``extract(net, arch)`` / ``net.extract(arch)``: a stand-alone ``VitnasSubnet`` with copies of the slices.
- ``train_supernet(space, data, workspace, TrainConfig(...))``: sandwich rule + in-place distillation.
- ``load_checkpoint(path, space=None)`` → ``(Supernet, sidecar dict)``.
- ``evaluate(checkpoint, arch, data)``: validation accuracy with inherited weights.
"""

from nas.supernet.checkpoint import load_checkpoint
from nas.supernet.evaluate import EvalResult, evaluate
from nas.supernet.subnet import VitnasSubnet
from nas.supernet.supernet import Supernet, extract, space_hash
from nas.supernet.train import TrainResult, train_supernet
from nas.training.config import TrainConfig

__all__ = [
    "EvalResult",
    "Supernet",
    "TrainConfig",
    "TrainResult",
    "VitnasSubnet",
    "evaluate",
    "extract",
    "load_checkpoint",
    "space_hash",
    "train_supernet",
]
