"""Ranking trust: does a supernet rank architectures as training them from scratch would?

``vitnas rank-check`` measures it for a user's own supernet (``check``): it picks subnets spread over
the space (``picking``), trains each from scratch with the one training loop on folds of the data
(``folds``, ``standalone``; results cached and resumable), scores each with inherited weights, and
reports Kendall tau, Spearman rho and top-k overlap with bootstrap intervals (``stats``). The result
is written into the supernet's sidecar and to MLflow, where ``vitnas pareto``, ``vitnas search`` and
the dashboard find it (``record``).

Importing this package is cheap (no torch): the CLI's ``--help`` reads it.
"""
