"""Token reduction and attention operators: pure torch, batched, no supernet knowledge.

Each file is one concern; the functional forms take weights as arguments so that a supernet can
call them with sliced weights, and the modules wrap them.
"""

from nas.ops.attention import Attention, SharedAttention, apply_shared_attention, attention, class_attention
from nas.ops.cluster import cluster_pool, kmeans, kmedoids
from nas.ops.evit import evit_fuse, evit_keep, fuse_topk
from nas.ops.linear_attention import LinearAttention, relu_linear_attention
from nas.ops.pooling import (
    TokenPool,
    avg_pool,
    check_pool,
    conv1d_pool,
    conv2d_pool,
    evit_pool,
    pool_stride,
    tome_pool,
)
from nas.ops.tome import Merge, bipartite_soft_matching, merge_wavg, tome_schedule

__all__ = [
    "Attention",
    "LinearAttention",
    "Merge",
    "SharedAttention",
    "TokenPool",
    "apply_shared_attention",
    "attention",
    "avg_pool",
    "bipartite_soft_matching",
    "check_pool",
    "class_attention",
    "cluster_pool",
    "conv1d_pool",
    "conv2d_pool",
    "evit_fuse",
    "evit_keep",
    "evit_pool",
    "fuse_topk",
    "kmeans",
    "kmedoids",
    "merge_wavg",
    "pool_stride",
    "relu_linear_attention",
    "tome_pool",
    "tome_schedule",
]
