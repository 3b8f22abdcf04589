"""Targets parse from and print to one string; fingerprints key measurements by machine and threads."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nas
from nas.errors import UserError
from nas.hardware.fingerprint import fingerprint
from nas.hardware.target import BACKENDS, DTYPES, Target

_common = {
    "dtype": st.sampled_from(DTYPES),
    "batch": st.integers(1, 4096),
    "resolution": st.none() | st.integers(1, 4096),
    "backend": st.sampled_from(BACKENDS),
}
targets = st.one_of(
    st.builds(Target, device=st.just("cpu"), threads=st.integers(1, 512), **_common),
    st.builds(Target, device=st.integers(0, 15).map("cuda:{}".format), threads=st.none(), **_common),
)


@given(targets)
def test_str_parses_back_to_an_equal_target(target):
    assert Target.parse(str(target)) == target


@given(targets, targets)
def test_key_separates_exactly_the_different_targets(a, b):
    assert (a.key() == b.key()) == (a == b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu:threads=2,batch=1", Target("cpu", threads=2, batch=1)),
        (
            "cuda:0:dtype=float16,batch=8,backend=compile",
            Target("cuda:0", dtype="float16", batch=8, backend="compile"),
        ),
        ("cpu:threads=4,batch=32,resolution=224", Target("cpu", threads=4, batch=32, resolution=224)),
        ("cuda", Target("cuda:0")),
        ("cuda:3", Target("cuda:3")),
        ("cuda:batch=2", Target("cuda:0", batch=2)),
        (" cpu : threads = 3 , dtype = bfloat16 ", Target("cpu", threads=3, dtype="bfloat16")),
    ],
)
def test_parse_examples(text, expected):
    assert Target.parse(text) == expected


def test_cpu_threads_default_to_torch_threads_and_are_written_out():
    target = Target.parse("cpu")
    assert target.threads == torch.get_num_threads()
    assert str(target) == f"cpu:threads={torch.get_num_threads()},dtype=float32,batch=1,backend=eager"


def test_input_shape_uses_the_resolution_else_the_models_size():
    assert Target.parse("cpu:batch=4,resolution=96").input_shape(224) == (4, 3, 96, 96)
    assert Target.parse("cpu:batch=4").input_shape(224, channels=1) == (4, 1, 224, 224)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("gpu:batch=1", ["unknown device 'gpu'", "cpu, cuda, cuda:N"]),
        ("cpu:threads=0", ["threads='0'", "positive integer"]),
        ("cpu:threads=two", ["threads='two'", "positive integer"]),
        ("cpu:batch=-1", ["batch='-1'", "positive integer"]),
        ("cpu:resolution=2.5", ["resolution='2.5'", "positive integer"]),
        ("cpu:dtype=float64", ["dtype='float64'", "float32, float16, bfloat16"]),
        ("cpu:backend=jit", ["backend='jit'", "eager, compile"]),
        ("cpu:color=red", ["unknown key 'color' for cpu", "threads, dtype, batch, resolution, backend"]),
        ("cuda:0:threads=2", ["unknown key 'threads' for cuda", "dtype, batch, resolution, backend"]),
        ("cuda:x:batch=1", ["cuda index 'x'"]),
        ("cpu:batch=1,batch=2", ["key 'batch' given twice"]),
        ("cpu:batch", ["option 'batch' is not key=value"]),
        ("cpu:batch=1,", ["option '' is not key=value"]),
        ("cpu:batch=1:threads=2", ["unexpected 'threads=2'"]),
    ],
)
def test_bad_target_names_the_string_and_the_bad_part(text, fragments):
    with pytest.raises(UserError) as caught:
        Target.parse(text)
    message = str(caught.value)
    assert "\n" not in message
    assert f"bad target {text!r}" in message
    for fragment in fragments:
        assert fragment in message


def test_fingerprint_is_stable_within_a_process():
    target = Target.parse("cpu:threads=1")
    first, second = fingerprint(target), fingerprint(target)
    assert first == second
    assert first.digest() == second.digest()
    assert re.fullmatch("[0-9a-f]{16}", first.digest())


def test_fingerprint_is_stable_across_processes():
    target = Target.parse("cpu:threads=1")
    code = (
        "from nas.hardware.fingerprint import fingerprint; from nas.hardware.target import Target; "
        "print(fingerprint(Target.parse('cpu:threads=1')).digest())"
    )
    root = Path(nas.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fingerprint(target).digest()


def test_fingerprint_changes_with_threads_and_nothing_else():
    one, two = fingerprint(Target.parse("cpu:threads=1")), fingerprint(Target.parse("cpu:threads=2"))
    assert one.digest() != two.digest()
    assert dataclasses.replace(one, threads=2) == two


def test_fingerprint_describes_this_machine():
    record = fingerprint(Target.parse("cpu:threads=1")).to_dict()
    assert record["torch_version"] == torch.__version__
    assert record["threads"] == 1
    assert record["cores"] >= 1 and record["cpu_model"]
    assert record["gpu_name"] is None  # a CPU latency does not depend on the GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_target_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="needs CUDA, which is not available"):
        fingerprint(Target.parse("cuda:0"))
