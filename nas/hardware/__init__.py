"""Hardware-aware scoring: targets (``target``), machine fingerprints (``fingerprint``), latency
measurement (``measure``), FLOPs and params (``flops``), the latency table and predictor
(``latency_table``, ``predictor``) and the shared result cache (``cache``).

Import the module you need: this package imports nothing itself, so the CLI's help and
``vitnas space show`` stay free of torch.
"""
