"""Where training lives: one loop for the supernet, ``vitnas train`` and ``vitnas finetune``.

- ``config``: the one hyperparameter object (``TrainConfig``) and the run's devices and precision;
- ``augment``: named augmentation presets (timm transforms, Mixup/CutMix);
- ``batches``: the batches of a step for this rank (in-memory tensors or DataLoader workers);
- ``distributed``: the process group (torchrun or Ray Train), one gradient reduction per step;
- ``loop``: the loop itself; a *step* (plain supervised, or the supernet's sandwich) is the only
  part that differs between what it trains;
- ``ray_train``: the same loop as Ray Train workers.

Importing this package imports nothing heavy; the submodules import torch.
"""
