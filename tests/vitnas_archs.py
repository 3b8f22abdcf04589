"""Architectures the timm-convention and ONNX tests run over: seeded random members of every shipped
psvit space, and hand-made architectures for the op kinds no shipped space draws (clustering inside
a stage with each method, conv2d pooling), so that together they cover every kind."""

from __future__ import annotations

import functools
import random

from nas.arch import ArchConfig, arch_from_dict
from nas.space import load_space, shipped_space_path, shipped_spaces

MEMBERS = 10
SEED = 14

# Every op kind between them: A has conv2d and cluster pooling, linear attention with a k-means
# reduction, weighted k-medoids, a share and an identity cell; B has 1 input channel, four stages,
# linear attention with ToMe, avg/tome/conv1d pooling, EViT after a share cell, k-medoids.
KIND_ARCHS = {
    "kinds-a": {
        "image_size": 16,
        "patch_size": 2,
        "in_chans": 3,
        "num_classes": 5,
        "stages": [
            {"tokens": 65, "dim": 16, "heads": 2, "mlp_ratio": 2.0, "cells": ["basic", "share", "identity"]},
            {
                "tokens": 17,
                "pool": "conv2d",
                "dim": 24,
                "heads": 2,
                "mlp_ratio": 2.0,
                "attention": "linear",
                "cells": ["basic", "basic"],
                "reduction": {"kind": "cluster", "keep_rate": 0.5, "at": [1], "method": "kmeans"},
            },
            {
                "tokens": 9,
                "pool": "cluster",
                "dim": 32,
                "heads": 4,
                "mlp_ratio": 2.0,
                "cells": ["basic", "basic"],
                "reduction": {"kind": "cluster", "keep_rate": 0.5, "at": [0], "method": "weighted_kmedoids"},
            },
        ],
    },
    "kinds-b": {
        "image_size": 16,
        "patch_size": 2,
        "in_chans": 1,
        "num_classes": 3,
        "stages": [
            {
                "tokens": 65,
                "dim": 16,
                "heads": 2,
                "mlp_ratio": 2.0,
                "attention": "linear",
                "cells": ["basic", "basic"],
                "reduction": {"kind": "tome", "r": [8, 4]},
            },
            {
                "tokens": 33,
                "pool": "avg",
                "dim": 24,
                "heads": 2,
                "mlp_ratio": 2.0,
                "cells": ["basic", "share", "basic"],
                "reduction": {"kind": "evit", "keep_rate": 0.5, "at": [2]},
            },
            {
                "tokens": 9,
                "pool": "tome",
                "dim": 32,
                "heads": 2,
                "mlp_ratio": 2.0,
                "cells": ["basic", "basic"],
                "reduction": {"kind": "cluster", "keep_rate": 0.5, "at": [1], "method": "kmedoids"},
            },
            {"tokens": 4, "pool": "conv1d", "dim": 32, "heads": 2, "mlp_ratio": 2.0, "cells": ["basic"]},
        ],
    },
}
ALL_KINDS = {
    "attention:softmax",
    "attention:linear",
    "cell:share",
    "reduction:tome",
    "reduction:evit",
    "cluster:kmeans",
    "cluster:kmedoids",
    "cluster:weighted_kmedoids",
    "pool:conv1d",
    "pool:conv2d",
    "pool:avg",
    "pool:tome",
    "pool:cluster",
}


def psvit_spaces() -> list[str]:
    return [name for name in shipped_spaces() if load_space(shipped_space_path(name)).family == "psvit"]


@functools.cache
def members(name: str) -> tuple[ArchConfig, ...]:
    """``MEMBERS`` seeded random members of shipped space ``name`` (or the hand-made ``kinds-*``)."""
    if name in KIND_ARCHS:
        return (arch_from_dict(KIND_ARCHS[name]),)
    space = load_space(shipped_space_path(name))
    rng = random.Random(SEED)
    return tuple(space.sample(rng) for _ in range(MEMBERS))


def kinds(arch: ArchConfig) -> set[str]:
    out = set()
    for i, st in enumerate(arch.stages):
        out.add(f"attention:{st.attention}")
        out |= {f"cell:{c}" for c in st.cells}
        if st.reduction.kind == "cluster":
            out.add(f"cluster:{st.reduction.method}")
        elif st.reduction.kind != "none" and any(st.reduction.reduces_at(j) for j in range(len(st.cells))):
            out.add(f"reduction:{st.reduction.kind}")
        if i:
            out.add(f"pool:{st.pool}")
    return out


def cases(per_space: int = MEMBERS) -> list[tuple[str, int]]:
    """``(space or kinds name, member index)`` for pytest parametrisation."""
    out = [(name, i) for name in psvit_spaces() for i in range(per_space)]
    return out + [(name, 0) for name in KIND_ARCHS]
