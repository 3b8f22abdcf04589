"""`vitnas space ...`: what it prints, its exit codes, and the one-line error on a bad file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.space import load_space

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "searchspaces" / "psvit-digits.yaml"


def test_space_show_prints_members_largest_smallest(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["space", "show", "searchspaces/psvit-digits.yaml"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    space = load_space(DIGITS)
    assert "space psvit-digits (psvit) from searchspaces/psvit-digits.yaml" in out
    assert "members: 18,330,624" in out
    assert f"members: {space.count():,}" in out
    # the choices
    assert "dim        [32, 48, 64]" in out
    assert "pool       ['conv1d', 'avg', 'cluster']" in out
    # largest and smallest, in that order, with their hashes
    assert out.index("largest:") < out.index("smallest:")
    largest, smallest = space.largest(), space.smallest()
    assert f"hash {largest.arch_hash()}" in out.split("smallest:")[0]
    assert f"hash {smallest.arch_hash()}" in out.split("smallest:")[1]
    assert "65->65->65" in out  # largest: no reduction in stage 0
    assert "65->57->57" in out  # smallest: ToMe r=8 after its only computing cell


def test_space_show_by_shipped_name(capsys):
    assert main(["space", "show", "psvit-digits"]) == 0
    out = capsys.readouterr().out
    assert "members: 18,330,624" in out and str(DIGITS) in out


def test_space_show_json(capsys):
    assert main(["space", "show", str(DIGITS), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    space = load_space(DIGITS)
    assert info["name"] == "psvit-digits" and info["family"] == "psvit"
    assert info["members"] == space.count() == 18_330_624
    assert info["largest"] == space.largest().to_dict()
    assert info["smallest"] == space.smallest().to_dict()
    assert info["choices"]["stages"][1]["tokens"] == [33, 17]
    assert info["source"] == str(DIGITS)


def test_space_show_timm(capsys):
    assert main(["space", "show", "deit-reduction", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["members"] == 24 and info["family"] == "timm"
    assert info["largest"]["schedule"] == {"kind": "none"}
    assert main(["space", "show", "deit-reduction"]) == 0
    out = capsys.readouterr().out
    assert "members: 24" in out and "deit_small_patch16_224" in out


def test_space_list(capsys):
    assert main(["space", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0]: line for line in lines}
    assert {"psvit-digits", "psvit-tiny", "deit-reduction"} <= set(names)
    assert "18,330,624" in names["psvit-digits"] and " 24 members" in names["deit-reduction"]


def _bad_file(tmp_path, mutate) -> Path:
    data = yaml.safe_load(DIGITS.read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda d: d["stages"][1].update(dim="big"), ["stages[1].dim", "'big'"]),
        (lambda d: d["stages"][0].update(dimm=[32]), ["stages[0].dimm", "Extra inputs are not permitted"]),
        (lambda d: d["stages"][0].update(heads=[3]), ["stages[0]", "heads 3", "dim 32"]),
        (lambda d: d["stages"][2].update(tokens=[40]), ["stages[2].tokens", "[40]"]),
    ],
    ids=["wrong-type", "unknown-key", "impossible-dims", "tokens-grow"],
)
def test_space_show_malformed_file(tmp_path, capsys, mutate, needles):
    path = _bad_file(tmp_path, mutate)
    for argv in (["space", "show", str(path)], ["space", "show", str(path), "--json"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == ""  # nothing runs on a bad file
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert err.startswith(f"vitnas: error: {path}: "), err
        for needle in needles:
            assert needle in err, (needle, err)


def test_space_show_unreadable_and_missing(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nstages: [\n")
    assert main(["space", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML" in err and str(bad) in err
    assert main(["space", "show", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such search-space file" in err and "psvit-digits" in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vitnas" in out and "commands:" in out and "space" in out
    with pytest.raises(SystemExit):
        main(["space", "show", "--help"])
    out = capsys.readouterr().out
    assert "--json" in out and "file" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: vitnas" in capsys.readouterr().out
    assert main(["space"]) == 2
    assert "show" in capsys.readouterr().out


def test_unknown_flag_is_a_usage_error(capsys):
    assert main(["space", "show", "psvit-digits", "--jsn"]) == 2
    err = capsys.readouterr().err  # the house format: one line, no usage block
    assert err.startswith("vitnas: error: ") and err.count("\n") == 1 and "unrecognized arguments: --jsn" in err


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "vitnas"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    done = subprocess.run([str(script), "space", "show", "psvit-digits"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "members: 18,330,624" in done.stdout
    assert "largest:" in done.stdout and "smallest:" in done.stdout
