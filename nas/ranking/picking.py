"""Which subnets a rank-check compares: spread over the space by FLOPs and kinds, or campaigns' fronts.

Spread (seeded), from the space's smallest to its largest member:

1. a pool of members (``pool``, default 6 per subnet, plus the largest and smallest) drawn at graded
   size levels: member i takes, for every size choice, the option at level (i + 1/2) / pool of its
   options (smallest to largest) give or take one step, and its kinds at random. Uniform random draws
   would crowd the middle of the cost range and almost never come near its ends;
2. each member's FLOPs (fvcore, on the extracted stand-alone network at batch 1);
3. the log-FLOPs range of the pool cut into as many equal-width bins as subnets wanted; from each bin
   the member whose kinds (each stage's attention, pooling and reduction kind) are least covered by the
   members taken so far, ties to the seeded draw order. A bin with no member left takes the nearest one.

So the picks cover the cost range evenly, and every kind the space offers, and the same seed picks the
same subnets. Ranking members of similar cost is harder than ranking across the range: the top-k
overlap reports how the best few agree.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.space import SearchSpace

POOL_PER_SUBNET = 6


@dataclass(frozen=True)
class Pick:
    arch: ArchConfig
    mflops: float
    source: str  # "spread" or "campaign NAME trial N"


def mflops(arch: ArchConfig) -> float:
    """fvcore MFLOPs of the extracted stand-alone subnet at batch 1."""
    import torch

    from nas.hardware.flops import flops
    from nas.supernet.subnet import VitnasSubnet

    x = torch.randn(1, arch.in_chans, arch.image_size, arch.image_size)
    return flops(VitnasSubnet(arch).eval(), x) / 1e6


def kinds(arch: ArchConfig) -> set[tuple]:
    """The kind choices ``arch`` makes: per stage its attention, pooling and reduction kind."""
    out = set()
    for i, st in enumerate(arch.stages):
        out |= {(i, "attention", st.attention), (i, "pool", st.pool), (i, "reduction", st.reduction.kind)}
    return out


class _Levelled:
    """Sizes at ``level`` in [0, 1] of each choice's options (smallest first), jittered by up to one
    option either way; kinds at random."""

    def __init__(self, rng: random.Random, level: float):
        self.rng, self.level = rng, level

    def choose(self, name, options):
        from nas.supernet.sampling import KIND_CHOICES, by_size

        options = list(options)
        if name.endswith(KIND_CHOICES):
            return self.rng.choice(options)
        ordered = by_size(name, options)[::-1]
        i = round(self.level * (len(ordered) - 1) + self.rng.uniform(-0.75, 0.75))
        return ordered[min(len(ordered) - 1, max(0, i))]


def levelled_pool(space: SearchSpace, size: int, seed: int) -> list[ArchConfig]:
    """``size`` distinct members at graded size levels, with the space's smallest and largest."""
    rng = random.Random(seed)
    levels = [(i + 0.5) / size for i in range(size)]
    rng.shuffle(levels)
    members = {a.arch_hash(): a for a in (space.smallest(), space.largest())}
    for attempt in range(size * 20):  # a small space may hold fewer distinct members than asked for
        arch = space.draw(_Levelled(rng, levels[attempt % size]))
        members.setdefault(arch.arch_hash(), arch)
        if len(members) >= size + 2:
            break
    return list(members.values())


def spread(space: SearchSpace, n: int, seed: int = 0, pool: int | None = None) -> list[Pick]:
    """``n`` distinct members spread over log-FLOPs and kinds (see the module docstring)."""
    members = levelled_pool(space, pool or POOL_PER_SUBNET * n, seed)
    if len(members) < n:
        raise UserError(f"--subnets {n}: space {space.name!r} gave only {len(members)} distinct members")
    scored = [(math.log(mflops(a)), i, a) for i, a in enumerate(members)]
    lo, hi = min(t[0] for t in scored), max(t[0] for t in scored)
    width = (hi - lo) / n or 1.0
    bins = [[t for t in scored if min(n - 1, int((t[0] - lo) / width)) == b] for b in range(n)]
    covered: Counter = Counter()
    taken: set[int] = set()
    picks = []
    for b in range(n):
        centre = lo + (b + 0.5) * width
        left = [t for t in bins[b] if t[1] not in taken]
        if not left:  # an empty bin: the nearest member not taken yet
            left = [min((t for t in scored if t[1] not in taken), key=lambda t: abs(t[0] - centre))]
        log_fl, i, arch = min(left, key=lambda t: (sum(covered[k] for k in kinds(t[2])), abs(t[0] - centre)))
        covered.update(kinds(arch))
        taken.add(i)
        picks.append(Pick(arch, math.exp(log_fl), "spread"))
    return sorted(picks, key=lambda p: p.mflops)


def from_campaigns(tracking_uri: str, names: list[str], space: SearchSpace) -> list[Pick]:
    """The Pareto-front trials of each campaign (distinct architectures, in campaign then front order)."""
    import tempfile

    from nas.arch import load_arch
    from nas.tracking import Campaign

    picks: dict[str, Pick] = {}
    for name in names:
        campaign = Campaign(tracking_uri, name, read_only=True)
        if not campaign.exists():
            raise UserError(f"--campaign {name!r}: no such campaign in {tracking_uri}")
        for row in campaign.front_rows():
            with tempfile.TemporaryDirectory() as tmp:
                arch = load_arch(campaign.client.download_artifacts(row["run_id"], "arch.yaml", tmp))
            if not space.contains(arch):
                raise UserError(
                    f"--campaign {name!r}: trial {row['trial_number']} is not a member of the supernet's space {space.name!r}"
                )
            if arch.arch_hash() not in picks:
                picks[arch.arch_hash()] = Pick(
                    arch, mflops(arch), f"campaign {name} trial {row['trial_number']}"
                )
    if len(picks) < 3:
        raise UserError(
            f"--campaign {', '.join(names)}: {len(picks)} distinct front architectures; a ranking needs at least 3"
        )
    return list(picks.values())
