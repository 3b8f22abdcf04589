"""The supernet levers: fair sampling, progressive shrinking, few-shot pins, the distillation target."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from nas.errors import UserError
from nas.space import load_space
from nas.supernet.sampling import FairChooser, SubnetSampler, by_size, parse_pin, pin_matches
from nas.training.config import TrainConfig


@pytest.fixture(scope="module")
def space():
    return load_space("psvit-digits")


def test_fair_sampling_deals_every_option_equally_often():
    chooser = FairChooser(random.Random(0))
    drawn = Counter(chooser.choose("s1.pool", ["conv1d", "avg", "tome"]) for _ in range(30))
    assert drawn == {"conv1d": 10, "avg": 10, "tome": 10}
    uniform = random.Random(0)
    assert Counter(uniform.choice(["conv1d", "avg", "tome"]) for _ in range(30)) != drawn


def test_fair_sampler_draws_legal_members_and_balances_kinds(space):
    sampler = SubnetSampler(space, TrainConfig(sampling="fair", random_subnets=3))
    sampler.start_epoch(0, random.Random(1))
    archs = [a for _ in range(20) for a in sampler.sandwich()[2:]]
    assert all(space.contains(a) for a in archs)
    pools = Counter(a.stages[2].pool for a in archs)
    assert max(pools.values()) - min(pools.values()) <= 1


def test_progressive_shrinking_opens_sizes_from_the_largest_down(space):
    config = TrainConfig(epochs=10, progressive_epochs=4, random_subnets=4)
    sampler = SubnetSampler(space, config)
    largest = space.largest()
    sampler.start_epoch(0, random.Random(0))
    early = [a for _ in range(10) for a in sampler.sandwich()]
    assert all(a.stages[i].dim == largest.stages[i].dim for a in early for i in range(3))
    sampler.start_epoch(3, random.Random(0))
    late = [a for _ in range(10) for a in sampler.sandwich()]
    assert sampler.open == 1.0 and {a.stages[0].dim for a in late} == {32, 48, 64}
    assert by_size("s0.r", [4, 8]) == [4, 8] and by_size("s1.tokens", [33, 17]) == [33, 17]


def test_a_pin_keeps_every_draw_in_its_part_of_the_space(space):
    sampler = SubnetSampler(space, TrainConfig(pin="s1.pool=tome", random_subnets=3))
    sampler.start_epoch(0, random.Random(0))
    archs = [a for _ in range(10) for a in sampler.sandwich()]
    assert all(a.stages[1].pool == "tome" and pin_matches(a, ("s1.pool", "tome")) for a in archs)
    assert not pin_matches(space.largest(), ("s1.pool", "tome"))
    with pytest.raises(UserError, match="offers pool"):
        parse_pin("s1.pool=cluster", space)
    with pytest.raises(UserError, match="sI.attention"):
        parse_pin("s9.pool=avg", space)


def test_default_sampling_is_the_uniform_draw_of_before(space):
    """The default config draws exactly what the sandwich drew before the levers existed (with its
    default number of random subnets)."""
    from nas.space import RandomChooser
    from nas.supernet.sampling import SmallestSizesChooser

    sampler = SubnetSampler(space, TrainConfig())
    sampler.start_epoch(5, random.Random(7))
    ours = [sampler.sandwich() for _ in range(3)]
    rng = random.Random(7)
    before = [
        [space.largest(), space.draw(SmallestSizesChooser(rng))]
        + [space.draw(RandomChooser(rng)) for _ in range(TrainConfig().random_subnets)]
        for _ in range(3)
    ]
    assert ours == before


def test_distill_none_trains_every_subnet_on_labels(space):
    from nas.supernet import Supernet
    from nas.supernet.train import SandwichStep
    from nas.training.loop import StepContext
    from nas.training.precision import grad_scaler

    torch.manual_seed(0)
    net = Supernet(space)
    ctx = StepContext(torch.device("cpu"), "fp32", grad_scaler(torch.device("cpu"), "fp32"), 1)
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    for distill in ("largest", "none"):
        step = SandwichStep(space, TrainConfig(distill=distill, random_subnets=1))
        step.start_epoch(0)
        net.zero_grad()
        assert torch.isfinite(torch.tensor(step(net, batch, ctx)))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(UserError, match="--distill"):
        TrainConfig(distill="teacher")
