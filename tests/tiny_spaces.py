"""A tiny two-stage psvit space drawing every cell, attention, pooling and reduction kind the supernet
trains with, small enough for a supernet epoch in a second (16 px digits, 17 then 5 tokens)."""

from __future__ import annotations

TWO_STAGES = {
    "name": "tiny-two-stages",
    "image_size": 16,
    "patch_size": 4,
    "num_classes": 10,
    "stages": [
        {
            "dim": [16, 24],
            "heads": [2],
            "mlp_ratio": [2.0],
            "attention": ["softmax", "linear"],
            "depth": [1, 2],
            "cells": ["basic", "share"],
            "reduction": {"kind": ["none", "tome"], "r": [2]},
        },
        {
            "tokens": [5],
            "pool": ["conv1d", "avg", "tome"],
            "dim": [32],
            "heads": [2, 4],
            "mlp_ratio": [2.0],
            "depth": [1, 2],
            "cells": ["basic", "share"],
            "reduction": {"kind": ["none", "evit"], "keep_rate": [0.5], "at": [0]},
        },
    ],
}
