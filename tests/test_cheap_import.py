"""``import nas``, ``vitnas --help`` and ``vitnas space show`` import neither torch nor timm, and
``timm.create_model("vitnas_subnet", ...)`` still works after ``import nas``, in either order."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "timm", "mlflow", "optuna", "ray")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_help_and_space_show_import_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from nas.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for argv in (['--help'], ['search', '--help'], ['profile', '--help'], ['latency-table', 'build', '--help']):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "    assert main(['space', 'show', 'psvit-digits']) == 0 and main(['space', 'list']) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert run(code) == "[]"


def test_vitnas_subnet_is_registered_whichever_is_imported_first():
    arch = "{'image_size': 16, 'patch_size': 4, 'num_classes': 10, 'stages': [{'tokens': 17, 'dim': 32, 'heads': 2, 'mlp_ratio': 2, 'cells': ['basic']}]}"
    build = f"m = timm.create_model('vitnas_subnet', arch={arch}); print(type(m).__name__)"
    assert run(f"import sys, nas; assert 'timm' not in sys.modules; import timm; {build}") == "VitnasSubnet"
    assert run(f"import timm, nas; {build}") == "VitnasSubnet"
