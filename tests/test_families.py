"""Each family module provides the whole ``Family`` protocol, and the rest of vitnas reaches a
family only through it."""

from __future__ import annotations

import inspect

import pytest

from nas.errors import UserError
from nas.families import NAMES, Family, family_named, family_of, require
from nas.space import load_space, shipped_spaces

MEMBERS = sorted(
    {name for name, _ in inspect.getmembers(Family, inspect.isfunction) if not name.startswith("_")}
    | set(Family.__annotations__)
)


@pytest.mark.parametrize("name", NAMES)
def test_a_family_module_provides_the_protocol(name):
    family = family_named(name)
    assert family.NAME == name
    missing = [m for m in MEMBERS if not hasattr(family, m)]
    assert not missing, f"nas.families.{name} lacks {missing}"
    for member in MEMBERS:
        if callable(getattr(Family, member, None)):
            ours = inspect.signature(getattr(family, member)).parameters
            protocol = [p for p in inspect.signature(getattr(Family, member)).parameters if p != "self"]
            assert list(ours) == protocol, (name, member)


@pytest.mark.parametrize("space_name", shipped_spaces())
def test_spaces_and_their_members_find_their_family(space_name):
    space = load_space(space_name)
    arch = space.sample(0)
    assert family_of(space) is family_of(arch) is family_named(space.family)
    assert space.contains(arch) and space.count() > 0
    assert family_of(arch).describe_arch(arch) and family_of(arch).drawing(arch)["family"] == space.family


def test_require_names_the_thing_and_both_families():
    with pytest.raises(UserError, match="space 'deit-reduction' is a timm space: a supernet needs a psvit space"):
        require(load_space("deit-reduction"), "psvit", "a supernet")
    with pytest.raises(UserError, match="unknown family 'adavit'"):
        family_named("adavit")
