"""Defaults of a latency-table build that the CLI shows in ``--help`` (kept free of torch imports)."""

PART_BUDGET_S = 0.15  # measure() time budget per part and pass
PASSES = 3
FIT_SUBNETS = 16  # whole subnets measured to fit the overhead
