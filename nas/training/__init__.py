"""Where training lives: one loop for the supernet, ``vitnas train`` and ``vitnas finetune``.

- ``config``: the one hyperparameter object (``TrainConfig``; ``batch_size`` is the global batch);
- ``augment``: named augmentation presets (timm transforms, Mixup/CutMix);
- ``batches``: the micro-batches of each step for this process (in memory, or DataLoader workers);
- ``devices``, ``precision``: ``--device`` and ``--precision`` (autocast, the fp16 gradient scaler);
- ``distributed``: the processes (one, torchrun's or Ray Train's) and the one gradient reduction a step;
- ``optim``, ``seeds``: AdamW with its schedule; the seeds of every random stream;
- ``loop``: the loop itself; a *step* (``SupervisedStep``, or the supernet's ``SandwichStep`` in
  ``nas.supernet.train``) is the only part that differs between what it trains;
- ``classifier``: a plain model through the loop (``vitnas train``, ``vitnas finetune``);
- ``ray_train``: supernet training as Ray Train workers.

Importing this package imports nothing heavy; the submodules import torch.
"""
