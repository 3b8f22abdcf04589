"""The ``--reduce`` mini-grammar of ``vitnas profile``: a token-reduction schedule for a timm model,
parsed into what ``nas.ops.timm_patch.apply`` takes (no torch here: the CLI's help shows it)::

    REDUCE := "none" | "tome:" OPTIONS | "evit:" OPTIONS
    OPTIONS := KEY "=" VALUE ("," KEY "=" VALUE)*          lists are "/"-separated: 3/6/9

    tome   r=INT            merges in every block (ToMe's constant schedule)
           r=INT/INT/...    merges per block, one entry per block
           decreasing=INT   from INT at the first block linearly down to 0 at the last (rounded)
           inflection=FLOAT with r=INT: the ToMe code's (r, inflection) schedule, -1 to 1;
                            -1 is the paper's decreasing one: 2r down to 0, truncated, so
                            decreasing=16 and r=8,inflection=-1 differ only by rounding
           order=NAME       reference (default): ToMe's matching as published; spatial:
                            vitnas's variant that keeps surviving tokens in sequence order
           prop_attn=BOOL   proportional attention (default true)
    evit   keep=FLOAT       keep rate in (0, 1] at the pruning blocks (required)
           layers=INT/...   0-based pruning blocks (required; EViT-S uses 3/6/9)
           prop_attn=BOOL   (default false)

Examples: ``tome:r=8``, ``tome:r=8,inflection=-1``, ``tome:r=8,order=spatial``,
``evit:keep=0.7,layers=3/6/9``.
"""

from __future__ import annotations

from nas.errors import UserError

REDUCE_HELP = __doc__[__doc__.index("    REDUCE") : __doc__.index("Examples")].rstrip()
_KEYS = {
    "tome": ("r", "decreasing", "inflection", "order", "prop_attn"),
    "evit": ("keep", "layers", "prop_attn"),
}
_ORDERS = ("reference", "spatial")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_reduce(text: str) -> dict:
    """The grammar in the module docstring → a ``nas.ops.timm_patch.apply`` schedule; one-line UserError."""
    kind, _, options = text.strip().partition(":")
    if kind == "none" and not options:
        return {"kind": "none"}
    if kind not in _KEYS:
        raise _bad(text, f"starts with {kind!r}; allowed: none, tome:..., evit:...")
    values: dict[str, str] = {}
    for item in options.split(",") if options else ():
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise _bad(text, f"{item.strip()!r} is not key=value")
        if key not in _KEYS[kind]:
            raise _bad(text, f"unknown key {key!r} for {kind} (allowed: {', '.join(_KEYS[kind])})")
        if key in values:
            raise _bad(text, f"key {key!r} given twice")
        values[key] = value
    schedule: dict = {"kind": kind}
    if "prop_attn" in values:
        if values["prop_attn"].lower() not in _BOOLS:
            raise _bad(text, f"prop_attn={values['prop_attn']!r} is not true or false")
        schedule["prop_attn"] = _BOOLS[values["prop_attn"].lower()]
    if kind == "tome":
        if ("r" in values) == ("decreasing" in values):
            raise _bad(text, "tome takes exactly one of r=INT, r=INT/INT/... or decreasing=INT")
        if "order" in values:
            if values["order"] not in _ORDERS:
                raise _bad(text, f"order={values['order']!r} is not one of {', '.join(_ORDERS)}")
            schedule["order"] = values["order"]
        if "inflection" in values:
            if "r" not in values or "/" in values["r"]:
                raise _bad(text, "inflection=FLOAT goes with a single r=INT")
            r = _ints(text, "r", values["r"])
            try:
                inflection = float(values["inflection"])
            except ValueError:
                inflection = 2.0
            if not -1 <= inflection <= 1:
                raise _bad(text, f"inflection={values['inflection']!r} is not a number in [-1, 1]")
            schedule["r"] = {"rule": "inflection", "r": r[0], "inflection": inflection}
        elif "r" in values:
            r = _ints(text, "r", values["r"])
            schedule["r"] = r[0] if len(r) == 1 and "/" not in values["r"] else r
        else:
            schedule["r"] = {
                "rule": "decreasing",
                "start": _ints(text, "decreasing", values["decreasing"])[0],
            }
        return schedule
    if "keep" not in values or "layers" not in values:
        raise _bad(text, "evit needs keep=FLOAT and layers=INT/INT/...")
    try:
        keep = float(values["keep"])
    except ValueError:
        keep = -1.0
    if not 0 < keep <= 1:
        raise _bad(text, f"keep={values['keep']!r} is not a number in (0, 1]")
    return {**schedule, "keep_rate": keep, "layers": _ints(text, "layers", values["layers"])}


def _ints(text: str, key: str, value: str) -> list[int]:
    parts = value.split("/")
    if not all(p.strip().isdigit() for p in parts):
        raise _bad(text, f"{key}={value!r} is not a non-negative integer or a /-separated list of them")
    return [int(p) for p in parts]


def _bad(text: str, reason: str) -> UserError:
    return UserError(f"bad --reduce {text!r}: {reason}")
