"""The names vitnas writes into MLflow and Optuna, in one place: every writer and reader imports them
from here (a light module: the dashboard and the CLI read them without importing MLflow).
"""

# -- objectives: metric names and the direction each is optimised in ---------------------------
ACCURACY = "val_accuracy"
LATENCY = "latency_ms"
OBJECTIVES = ((ACCURACY, "max"), (LATENCY, "min"))

# -- tags ---------------------------------------------------------------------------------------
ROLE = "vitnas.role"  # campaign, trial, train, supernet, ...
CAMPAIGN = "vitnas.campaign"
FAILURE = "vitnas.failure"
SOURCE_RUN = "vitnas.source_run_id"  # a training run's link back to the trial it came from
#: Where a resumed campaign records a param value that differs from the one logged first.
RESUMED = "vitnas.resumed."
TRIAL_NUMBER = "trial_number"
ARCH_HASH = "arch_hash"
FINGERPRINT = "fingerprint"  # the machine and runtime a latency was measured on
PARETO = "pareto"
PARETO_RANK = "pareto_rank"
SUPERNET_HASH = "supernet_hash"  # psvit campaigns: the supernet checkpoint's weights hash
WEIGHTS_HASH = "weights_hash"  # timm campaigns: the model's weights file hash
FROZEN_WEIGHTS = "frozen_weights"  # the campaign's frozen copy of the weights it scored (export reads it)
#: The latency budget (ms, or ``none``): a campaign's param, and the tag on its parent run that says
#: which budget the trials' ``best_under_budget`` tags were last computed for.
BUDGET = "latency_budget_ms"
