"""Behaviour of nas.space: loading and validating spaces, drawing (seeded, Optuna, extremes),
membership and counting, and the one-line errors of malformed files."""

import copy
import random
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nas.arch import ArchConfig, TimmArch, arch_from_dict, arch_from_text, arch_problems
from nas.errors import UserError
from nas.space import SearchSpace, load_space, shipped_spaces, space_from_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["deit-reduction", "psvit-digits", "psvit-tiny"]
PSVIT = ["psvit-digits", "psvit-tiny"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def spaces() -> dict[str, SearchSpace]:
    return {name: load_space(name) for name in SHIPPED}


def digits_dict() -> dict:
    return yaml.safe_load((REPO / "searchspaces" / "psvit-digits.yaml").read_text())


class EnumChooser:
    """Follows a prefix of option indices, then takes the first option; records what it was offered."""

    def __init__(self, prefix):
        self.prefix, self.offered = list(prefix), []

    def choose(self, name, options):
        options = list(options)
        k = len(self.offered)
        i = self.prefix[k] if k < len(self.prefix) else 0
        self.offered.append((name, i, len(options)))
        return options[i]


def every_draw(space: SearchSpace, limit: int = 100_000):
    """Every decision sequence the space's define-by-run drawing can take (depth-first, like an odometer).

    Returns (the params of each draw, the architectures drawn); None when more than ``limit`` draws."""
    prefix, params, archs = [], [], []
    while True:
        chooser = EnumChooser(prefix)
        archs.append(space.draw(chooser))
        params.append({name: None for name, _, _ in chooser.offered})
        if len(archs) > limit:
            return None
        idx = [i for _, i, _ in chooser.offered]
        sizes = [n for _, _, n in chooser.offered]
        while idx and idx[-1] + 1 >= sizes[-1]:
            idx.pop()
            sizes.pop()
        if not idx:
            return params, archs
        idx[-1] += 1
        prefix = idx


def proxy(arch: ArchConfig) -> int:
    """Params proxy: sum over stages of dim x computing cells."""
    return sum(s.dim * s.depth for s in arch.stages)


# -- loading -----------------------------------------------------------------------------------
def test_shipped_spaces_are_listed():
    assert set(SHIPPED) <= set(shipped_spaces())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_loads_by_name_and_by_path(name):
    by_name = load_space(name)
    by_path = load_space(REPO / "searchspaces" / f"{name}.yaml")
    assert by_name.name == by_path.name == name
    assert by_name.spec == by_path.spec
    assert by_path.source == str(REPO / "searchspaces" / f"{name}.yaml")
    assert by_name.count() > 0
    assert by_name.describe()["name"] == name


def test_shipped_counts(spaces):
    assert spaces["deit-reduction"].count() == 24
    assert spaces["psvit-digits"].count() == 18_330_624
    assert spaces["psvit-tiny"].count() == 625_268_160


def test_first_stage_tokens_come_from_the_grid(spaces):
    assert spaces["psvit-digits"].spec.stages[0].tokens == (65,)
    assert spaces["psvit-tiny"].spec.stages[0].tokens == (197,)
    assert spaces["psvit-digits"].describe()["stages"][0]["tokens"] == [65]


# -- seeded draws (property) --------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**63))
def test_sample_is_a_legal_member_and_deterministic(spaces, name, seed):
    space = spaces[name]
    arch = space.sample(seed)
    assert space.contains(arch)
    assert space.sample(seed) == arch
    assert space.sample(random.Random(seed)) == arch
    back = arch_from_text(arch.to_yaml())
    assert back == arch and space.contains(back)
    if isinstance(arch, ArchConfig):
        assert arch_problems(arch) == []
        largest, smallest = space.largest(), space.smallest()
        assert proxy(smallest) <= proxy(arch) <= proxy(largest)
        for s, big in zip(arch.stages, largest.stages):
            assert s.dim <= big.dim and s.depth <= big.depth and s.tokens <= big.tokens


def test_samples_vary(spaces):
    for name in SHIPPED:
        hashes = {spaces[name].sample(seed).arch_hash() for seed in range(40)}
        assert len(hashes) > 10, name


# -- extremes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_largest_and_smallest_are_members(spaces, name):
    space = spaces[name]
    largest, smallest = space.largest(), space.smallest()
    assert space.contains(largest) and space.contains(smallest)
    assert largest != smallest
    if isinstance(largest, ArchConfig):
        samples = [space.sample(seed) for seed in range(300)]
        assert proxy(largest) >= max(proxy(a) for a in samples)
        assert proxy(smallest) <= min(proxy(a) for a in samples)


def test_digits_largest_and_smallest_by_hand(spaces):
    largest, smallest = spaces["psvit-digits"].largest(), spaces["psvit-digits"].smallest()
    assert [s.dim for s in largest.stages] == [64, 96, 128]
    assert [s.heads for s in largest.stages] == [4, 4, 4]
    assert [s.mlp_ratio for s in largest.stages] == [3.0, 3.0, 3.0]
    assert [s.tokens for s in largest.stages] == [65, 33, 9]
    assert [s.cells for s in largest.stages] == [("basic",) * 2, ("basic",) * 3, ("basic",) * 2]
    assert [s.attention for s in largest.stages] == ["softmax"] * 3
    assert all(s.reduction.kind == "none" for s in largest.stages)
    assert proxy(largest) == 64 * 2 + 96 * 3 + 128 * 2
    assert [s.dim for s in smallest.stages] == [32, 64, 96]
    assert [s.tokens for s in smallest.stages] == [65, 17, 5]
    assert [s.depth for s in smallest.stages] == [1, 1, 1]
    assert proxy(smallest) == 32 + 64 + 96


def test_timm_extremes(spaces):
    space = spaces["deit-reduction"]
    assert space.largest().schedule == {"kind": "none"}
    assert space.smallest().schedule["kind"] != "none"


# -- Optuna define-by-run -----------------------------------------------------------------------
def _check_conditional(space: SearchSpace, params: dict, arch):
    """Parameters appear only where they mean something."""
    if isinstance(arch, TimmArch):
        kind = params.get("reduction", space.spec.reduction.kind[0])
        assert ("tome.r" in params) == ("tome.rule" in params) == (kind == "tome")
        assert ("evit.keep_rate" in params) == ("evit.layers" in params) == (kind == "evit")
        return
    for i, (choices, s) in enumerate(zip(space.spec.stages, arch.stages)):
        p = f"s{i}."
        tag = "_linear" if s.attention == "linear" else ""
        other = "" if tag else "_linear"
        names = {k for k in params if k.startswith(p)}
        assert params[p + "attention"] == s.attention
        assert params[p + "depth"] == len([c for c in s.cells if c != "identity"]) or "identity" in choices.cells
        assert not any(k.endswith(other) and (".cell" in k or ".reduction" in k) for k in names if other), names
        if tag:
            assert p + "reduction" not in names and not any(k.startswith(p + "cell") and not k.endswith(tag) for k in names)
        cell_params = sorted(int(k[len(p) + 4:].removesuffix(tag)) for k in names if k.startswith(p + "cell"))
        assert all(1 <= j < params[p + "depth"] for j in cell_params)
        kind = params.get(p + "reduction" + tag)
        assert (p + "r" in names) == (kind == "tome")
        assert (p + "keep_rate" in names) == (kind in ("evit", "cluster"))
        assert (p + "method" in names) == (kind == "cluster")
        if s.reduction.kind != "none":
            assert s.reduction.kind == kind


@pytest.mark.parametrize("name", ["psvit-digits", "psvit-tiny", "deit-reduction"])
@pytest.mark.parametrize("sampler_kind", ["random", "tpe"])
def test_optuna_study_draws_members(spaces, name, sampler_kind):
    space = spaces[name]
    sampler = (optuna.samplers.RandomSampler(seed=1) if sampler_kind == "random"
               else optuna.samplers.TPESampler(seed=1, n_startup_trials=8))
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler,
                                directions=["maximize"])
    drawn = {}

    def objective(trial):
        arch = space.from_trial(trial)
        assert space.contains(arch)
        assert space.from_params(trial.params) == arch
        drawn[trial.number] = arch
        return proxy(arch) if isinstance(arch, ArchConfig) else len(arch.to_json())

    study.optimize(objective, n_trials=30)
    trials = study.trials
    assert len(trials) == 30
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # one distribution per parameter name across the whole study
    seen = {}
    for t in trials:
        for pname, dist in t.distributions.items():
            assert seen.setdefault(pname, dist) == dist, pname
            assert isinstance(dist, optuna.distributions.CategoricalDistribution)
            assert t.params[pname] in dist.choices
        assert space.from_params(t.params) == drawn[t.number]
        _check_conditional(space, t.params, drawn[t.number])
    assert len({a.arch_hash() for a in drawn.values()}) > 5


def test_optuna_conditional_params_on_digits(spaces):
    """Parameters of a linear stage live under their own names; reduction params only where drawn."""
    space = spaces["psvit-digits"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: proxy(space.from_trial(t)), n_trials=60)
    names = set().union(*(t.params for t in study.trials))
    assert {"s0.attention", "s0.dim", "s0.depth", "s0.reduction", "s0.reduction_linear", "s0.r",
            "s1.tokens", "s1.pool", "s1.keep_rate", "s1.cell1", "s1.cell2", "s2.cell1"} <= names
    assert "s0.tokens" in names  # a single choice, still recorded
    assert "s2.reduction" not in names  # nothing to choose
    assert "s0.cell1_linear" not in names  # linear attention has no share: only basic is left
    assert "s0.keep_rate" not in names and "s1.method" not in names
    for t in study.trials:
        if t.params["s1.attention"] == "linear":
            assert "s1.reduction" not in t.params and t.params["s1.reduction_linear"] in ("none", "tome")


def test_same_sampler_seed_same_archs(spaces):
    space = spaces["psvit-digits"]
    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
        archs = []
        study.optimize(lambda t, archs=archs: archs.append(space.from_trial(t)) or 0.0, n_trials=10)
        runs.append([a.arch_hash() for a in archs])
    assert runs[0] == runs[1]


def test_from_params_needs_every_decision(spaces):
    with pytest.raises(KeyError):
        spaces["psvit-digits"].from_params({"s0.dim": 32})


# -- counting ------------------------------------------------------------------------------------
TINY = """\
name: tiny
image_size: 8
patch_size: 4     # a 2x2 grid: 5 tokens
num_classes: 2
stages:
  - dim: [8, 16]
    heads: [2]
    depth: [1, 2]
    cells: [basic, share]
    reduction:
      kind: [none, tome]
      r: [1, 2]
"""


def test_count_tiny_space_by_hand(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    space = load_space(path)
    params, archs = every_draw(space)
    # per dim: depth 1 -> none, r=1 -> (1, 0), r=2 -> (2, 0): 3
    #          depth 2 basic,basic -> none, (1, 1), (2, 1): 3 (the second cell sees 4 tokens: at most 1 merge)
    #          depth 2 basic,share -> no merge is legal before a share: none, and twice the same: 1
    # 7 structures x 2 dims = 14 architectures from 18 draws
    assert len(archs) == 18
    distinct = {a.to_json() for a in archs}
    assert len(distinct) == 14
    assert space.count() == 14
    assert all(space.contains(a) for a in archs)
    traces = {a.stages[0].cells + (tuple(a.stages[0].reduction.r),) for a in archs}
    assert ("basic", "basic", (2, 1)) in traces and ("basic", "share", ()) in traces


def test_count_two_stage_space_brute_force(tmp_path):
    text = """\
name: small
image_size: 12
patch_size: 4       # 3x3 grid: 10 tokens
num_classes: 3
stages:
  - dim: [8]
    heads: [1, 2]
    attention: [softmax, linear]
    depth: [1, 2]
    cells: [basic, share, identity]
    reduction: {kind: [none, tome, evit], r: [1, 3], keep_rate: [0.5, 0.7], at: [0, 1]}
  - tokens: [5, 3]
    pool: [avg, cluster]
    dim: [16]
    heads: [2]
    attention: [linear, softmax]
    depth: [1, 2]
    cells: [basic, share]
    reduction: {kind: [none, cluster], keep_rate: [0.5], at: [0], method: [kmeans, kmedoids]}
"""
    path = tmp_path / "small.yaml"
    path.write_text(text)
    space = load_space(path)
    _, archs = every_draw(space)
    distinct = {a.to_json(): a for a in archs}
    assert len(archs) > len(distinct)  # different draws give the same architecture ...
    assert space.count() == len(distinct)  # ... and count() counts architectures
    for a in distinct.values():
        assert arch_problems(a) == [] and space.contains(a)
    assert space.largest().to_json() in distinct and space.smallest().to_json() in distinct


def test_evit_only_stage_with_linear_choice(tmp_path):
    """A stage may offer linear attention next to an evit-only reduction: linear draws no reduction."""
    data = {"name": "e", "image_size": 8, "patch_size": 4, "num_classes": 2,
            "stages": [{"dim": [8], "heads": [2], "attention": ["softmax", "linear"], "depth": [1],
                        "reduction": {"kind": ["evit"], "keep_rate": [0.5], "at": [0]}}]}
    space = space_from_dict(data)
    _, archs = every_draw(space)
    kinds = {(a.stages[0].attention, a.stages[0].reduction.kind) for a in archs}
    assert kinds == {("softmax", "evit"), ("linear", "none")}
    assert space.count() == 2
    assert {space.sample(seed).stages[0].attention for seed in range(20)} == {"softmax", "linear"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: proxy(space.from_trial(t)), n_trials=10)


def test_reduction_at_choices_in_any_order(tmp_path):
    data = {"name": "a", "image_size": 16, "patch_size": 4, "num_classes": 2,
            "stages": [{"dim": [8], "heads": [2], "depth": [3],
                        "reduction": {"kind": ["evit"], "keep_rate": [0.5], "at": [2, 0]}}]}
    space = space_from_dict(data)
    arch = space.sample(0)
    assert arch.stages[0].reduction.at == (0, 2)
    # 16 patch tokens -> 8 kept + 1 fused + cls = 10; then 9 -> ceil(4.5) = 5 + 1 fused + cls = 7
    assert arch.token_trace() == [[10, 10, 7]]
    assert space.contains(arch) and space.count() == 1


# -- membership ----------------------------------------------------------------------------------
def _modified(arch: ArchConfig, stage: int, **changes) -> ArchConfig:
    data = arch.to_dict()
    data["stages"][stage].update(changes)
    return arch_from_dict(data)


def test_contains_rejects_foreign_and_off_choice_archs(spaces):
    digits, tiny, deit = spaces["psvit-digits"], spaces["psvit-tiny"], spaces["deit-reduction"]
    big = digits.largest()
    assert digits.contains(big)
    assert not digits.contains(tiny.largest())
    assert not tiny.contains(big)
    assert not digits.contains(deit.largest()) and not deit.contains(big)
    assert not digits.contains(_modified(big, 0, dim=40))  # legal (40 % 4 == 0), not a choice
    assert not digits.contains(_modified(big, 1, mlp_ratio=2.5))
    assert not digits.contains(_modified(big, 2, heads=2))  # stage 2 offers heads [4] only
    assert not digits.contains(_modified(big, 1, tokens=25))
    assert not digits.contains(_modified(big, 1, pool="cluster"))  # stage 1 pools: conv1d, avg, tome
    assert not digits.contains(arch_from_dict({**big.to_dict(), "num_classes": 11}))
    # legal and made of choices, but a ToMe placement the space never draws: r=4 at every basic cell
    drawn = _modified(big, 0, reduction={"kind": "tome", "r": [4, 4]})
    assert digits.contains(drawn)
    assert not digits.contains(_modified(big, 0, reduction={"kind": "tome", "r": [4, 0]}))
    assert not digits.contains(_modified(big, 0, reduction={"kind": "tome", "r": [5, 5]}))
    # a stage deeper than the space allows
    assert not digits.contains(_modified(big, 0, cells=["basic", "basic", "basic"]))


def test_contains_timm(spaces):
    space = spaces["deit-reduction"]
    member = space.from_params({"reduction": "tome", "tome.r": 13, "tome.rule": "constant"})
    assert space.contains(member)
    assert space.contains(TimmArch.model_validate(member.to_dict()))
    assert not space.contains(member.model_copy(update={"model": "deit_tiny_patch16_224"}))
    assert not space.contains(TimmArch(model="deit_small_patch16_224", schedule={"kind": "tome", "r": [12] * 12}))
    assert not space.contains(TimmArch(model="deit_small_patch16_224", schedule={"kind": "tome", "r": [13] * 11}))
    assert not space.contains(TimmArch(model="deit_small_patch16_224",
                                       schedule={"kind": "evit", "keep_rate": 0.7, "layers": [1, 2, 3]}))


# -- the timm family -----------------------------------------------------------------------------
def test_deit_reduction_members_by_hand(spaces):
    space = spaces["deit-reduction"]
    combos = [{"reduction": "none"}]
    combos += [{"reduction": "tome", "tome.r": r, "tome.rule": rule} for r in (4, 8, 13, 16)
               for rule in ("constant", "decreasing")]
    combos += [{"reduction": "evit", "evit.keep_rate": k, "evit.layers": ls}
               for k in (0.5, 0.6, 0.7, 0.8, 0.9) for ls in ("3,6,9", "4,7,10", "2,5,8")]
    members = {space.from_params(c).to_json(): space.from_params(c) for c in combos}
    assert len(combos) == len(members) == 24 == space.count()  # 1 + 4 x 2 + 5 x 3
    assert all(space.contains(a) for a in members.values())
    _, archs = every_draw(space)
    assert {a.to_json() for a in archs} == set(members)
    assert all(a.model == "deit_small_patch16_224" and a.image_size == 224 and a.num_classes == 1000
               for a in members.values())


def test_tome_schedules(spaces):
    space = spaces["deit-reduction"]

    def schedule(r, rule):
        return space.from_params({"reduction": "tome", "tome.r": r, "tome.rule": rule}).schedule

    dec = schedule(8, "decreasing")
    assert dec == {"kind": "tome", "r": [16, 15, 13, 12, 10, 9, 7, 6, 4, 3, 1, 0]}
    assert sum(dec["r"]) == 8 * 12  # the same merges in all as a constant r
    assert schedule(8, "constant") == {"kind": "tome", "r": [8] * 12}
    assert schedule(13, "decreasing")["r"][0] == 26 and schedule(13, "decreasing")["r"][-1] == 0
    evit = space.from_params({"reduction": "evit", "evit.keep_rate": 0.7, "evit.layers": "3,6,9"})
    assert evit.schedule == {"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]}
    assert space.from_params({"reduction": "none"}).schedule == {"kind": "none"}


# -- malformed files ---------------------------------------------------------------------------
def _set(path, value):
    def apply(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return apply


MALFORMED = {
    "wrong type": (_set(["stages", 1, "dim"], "big"), ["stages[1].dim", "'big'"]),
    "wrong item type": (_set(["stages", 1, "dim"], [64, "big"]), ["stages[1].dim[1]", "'big'"]),
    "wrong top-level type": (_set(["image_size"], "large"), ["image_size", "'large'"]),
    "unknown key": (lambda d: d["stages"][0].update(dimm=[32]), ["stages[0].dimm", "Extra inputs are not permitted"]),
    "unknown top-level key": (_set(["num_clases"], 10), ["num_clases", "Extra inputs are not permitted"]),
    "unknown reduction key": (_set(["stages", 1, "reduction", "keep"], [0.5]), ["stages[1].reduction.keep"]),
    "bad literal": (_set(["stages", 1, "pool"], ["conv1d", "maxpool"]), ["stages[1].pool[1]", "'maxpool'"]),
    "heads not dividing dim": (_set(["stages", 0, "heads"], [2, 3]), ["stages[0]", "heads 3", "dim 32"]),
    "tokens growing": (_set(["stages", 2, "tokens"], [40, 9]), ["stages[2].tokens", "40", "never grow"]),
    "first stage tokens": (_set(["stages", 0, "tokens"], [64]), ["stages[0].tokens", "65"]),
    "empty choices": (_set(["stages", 1, "dim"], []), ["stages[1].dim", "needs at least one choice"]),
    "repeated choices": (_set(["stages", 1, "depth"], [1, 2, 2]), ["stages[1].depth", "choices repeat"]),
    "evit with only linear": (lambda d: d["stages"][1].update(attention=["linear"], cells=["basic"]),
                              ["stages[1]", "evit", "softmax"]),
    "share with only linear": (_set(["stages", 2, "attention"], ["linear"]), ["stages[2]", "share"]),
    "conv2d after reducing stage": (
        lambda d: d["stages"][1].update(pool=["conv2d"], tokens=[17]),
        ["stages[1].pool", "conv2d", "stages[0].reduction.kind"],
    ),
    "conv2d non-square": (_set(["stages", 1, "pool"], ["conv2d"]), ["stages[1].pool", "conv2d"]),
    "tome without r": (lambda d: d["stages"][0]["reduction"].pop("r"), ["stages[0].reduction", "r choices"]),
    "keep_rate out of range": (_set(["stages", 1, "reduction", "keep_rate"], [0.5, 1.5]), ["stages[1].reduction", "1.5"]),
    "negative at": (_set(["stages", 1, "reduction", "at"], [-1, 0]), ["stages[1].reduction.at", "-1"]),
    "at beyond depth": (_set(["stages", 1, "reduction", "at"], [0, 3]), ["stages[1]", "reduction.at"]),
    "depth zero": (_set(["stages", 0, "depth"], [0, 1]), ["stages[0].depth[0]", "(got 0)"]),
    "heads zero": (_set(["stages", 0, "heads"], [0, 2]), ["stages[0].heads[0]", "(got 0)"]),
    "negative dim": (_set(["stages", 1, "dim"], [64, -96]), ["stages[1].dim[1]", "(got -96)"]),
    "mlp_ratio zero": (_set(["stages", 2, "mlp_ratio"], [0.0]), ["stages[2].mlp_ratio[0]", "(got 0.0)"]),
    "missing field": (lambda d: d["stages"][2].pop("dim"), ["stages[2].dim", "Field required"]),
    "missing pool": (lambda d: d["stages"][2].pop("pool"), ["stages[2]", "pool"]),
    "patch not dividing image": (_set(["patch_size"], 5), ["image_size 32", "patch_size 5"]),
    "no stages": (_set(["stages"], []), ["stages"]),
}


def _expect_one_line(path, needles):
    with pytest.raises(UserError) as err:
        load_space(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_space_is_one_line_error(tmp_path, case):
    mutate, needles = MALFORMED[case]
    data = digits_dict()
    mutate(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _expect_one_line(path, needles)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("- a\n- b\n", ["a search space is a mapping", "list"]),
        ("just a string\n", ["a search space is a mapping", "str"]),
        ("", ["a search space is a mapping"]),
        ("name: x\nstages: [\n  - dim: [8]\n", ["not valid YAML at line 3, column 3", "found '-'"]),
        ("name: x\n\tdim: 3\n", ["not valid YAML at line 2, column 1", "'\\t'"]),
        ("name: x\x07\n", ["not valid YAML at character 8: unacceptable character #x0007"]),
    ],
)
def test_unreadable_space_files(tmp_path, text, needles):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    _expect_one_line(path, needles)


def test_yaml_errors_name_the_file_not_the_string_it_was_read_into(tmp_path):
    """PyYAML names the stream it parsed: ``in "<unicode string>"`` for the text read from the file."""
    path = tmp_path / "space.yaml"
    path.write_text("name: x\nstages: [\n  - dim: [8]\n")
    with pytest.raises(UserError) as err:
        load_space(path)
    assert str(err.value).startswith(f"{path}: not valid YAML at line 3, column 3: ")
    assert "<unicode string>" not in str(err.value) and "^" not in str(err.value)


def test_missing_space_file_is_not_replaced_by_a_shipped_one(tmp_path):
    for missing in (tmp_path / "nope.yaml", tmp_path / "psvit-digits.yaml", "no/such/dir/psvit-digits.yaml"):
        with pytest.raises(UserError) as err:
            load_space(missing)
        msg = str(err.value)
        assert "no such search-space file" in msg and "\n" not in msg and "psvit-digits" in msg
    assert load_space("psvit-digits.yaml").name == "psvit-digits"


def test_malformed_timm_spaces(tmp_path):
    base = yaml.safe_load((REPO / "searchspaces" / "deit-reduction.yaml").read_text())
    cases = [
        (_set(["reduction", "kind"], []), ["reduction.kind", "needs at least one choice"]),
        (_set(["reduction", "kind"], ["none", "tome", "merge"]), ["reduction.kind[2]", "'merge'"]),
        (lambda d: d["reduction"].pop("tome"), ["reduction", "tome"]),
        (_set(["reduction", "tome", "r"], []), ["reduction.tome.r", "needs at least one choice"]),
        (_set(["reduction", "tome", "r"], [0, 8]), ["reduction.tome.r", ">= 1"]),
        (_set(["reduction", "evit", "keep_rate"], [0.7, 1.5]), ["reduction.evit.keep_rate", "1.5"]),
        (_set(["reduction", "evit", "layers"], [[3, 6, 12]]), ["reduction.evit.layers", "12"]),
        (_set(["reduction", "evit", "layers"], [[9, 6, 3]]), ["reduction.evit.layers", "[9, 6, 3]"]),
        (_set(["depth"], "twelve"), ["depth", "'twelve'"]),
        (_set(["modell"], "x"), ["modell", "Extra inputs are not permitted"]),
    ]
    for i, (mutate, needles) in enumerate(cases):
        data = copy.deepcopy(base)
        mutate(data)
        path = tmp_path / f"timm{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        _expect_one_line(path, needles)


# -- random small spaces (property) -------------------------------------------------------------
def _random_space(rng: random.Random) -> dict:
    def some(options, k=None):
        return rng.sample(options, k or rng.randint(1, 2))

    grid = rng.choice([2, 3, 4])
    stages, prev = [], [grid * grid + 1]
    for i in range(rng.randint(1, 3)):
        stage = {"dim": some([8, 16]), "heads": some([1, 2]), "depth": some([1, 2, 3]),
                 "attention": some(["softmax", "linear"]), "cells": some(["basic", "share", "identity"])}
        if i:
            stage["tokens"] = sorted({rng.randint(2, min(prev)) for _ in range(rng.randint(1, 2))})
            stage["pool"] = some(["conv1d", "avg", "tome", "cluster", "conv2d"])
            prev = stage["tokens"]
        kinds = some(["none", "tome", "evit", "cluster"], rng.randint(1, 3))
        red = {"kind": kinds}
        if "tome" in kinds:
            red["r"] = some([1, 2, 3])
        if {"evit", "cluster"} & set(kinds):
            red.update(keep_rate=some([0.5, 0.7, 0.9]), at=some([0, 1, 2]), method=some(["kmeans", "kmedoids"]))
        stage["reduction"] = red
        stages.append(stage)
    return {"name": "random", "image_size": 4 * grid, "patch_size": 4, "num_classes": 2, "stages": stages}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_random_spaces_draw_legal_members_and_count_distinct(seed):
    data = _random_space(random.Random(seed))
    try:
        space = space_from_dict(data)
    except UserError as err:
        assert "\n" not in str(err)
        assume(False)
    drawn = every_draw(space, limit=3000)
    assume(drawn is not None)
    _, archs = drawn
    distinct = {a.to_json(): a for a in archs}
    assert space.count() == len(distinct)
    for arch in distinct.values():
        assert arch_problems(arch) == []
        assert space.contains(arch)
    assert space.largest().to_json() in distinct
    assert space.smallest().to_json() in distinct
    assert space.sample(seed).to_json() in distinct


def test_error_in_the_only_stage_names_just_that_stage(tmp_path):
    """A failing item must not add a bogus 'stages: at least 1 item, not 0' to the message."""
    path = tmp_path / "one.yaml"
    path.write_text("name: one\nimage_size: 8\npatch_size: 4\nnum_classes: 2\nstages:\n  - {dim: [8], heads: [3], depth: [1]}\n")
    msg = _expect_one_line(path, ["stages[0]", "heads 3", "dim 8"])
    assert "at least 1 item" not in msg
    path.write_text("name: one\nimage_size: 8\npatch_size: 4\nnum_classes: 2\nstages: []\n")
    assert "stages: Tuple should have at least 1 item" in _expect_one_line(path, [])
