"""Entry script of a campaign on a Ray cluster: ``vitnas search --backend ray`` on the head node.

    ray submit runners/cluster-local.yaml runners/campaign.py -- --space ... --campaign ...
    ray job submit --working-dir . -- python runners/campaign.py --space ... --campaign ...

Every argument is ``vitnas search``'s; ``--backend ray`` and ``--address auto`` (the cluster this
script runs on) are added unless given. Submitting the same command again resumes the campaign.
"""

from __future__ import annotations

import sys


def search_argv(args: list[str]) -> list[str]:
    """``vitnas search`` arguments for a campaign on the cluster this script runs on."""
    argv = ["search", *args]
    if not any(a == "--backend" or a.startswith("--backend=") for a in args):
        argv += ["--backend", "ray"]
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        argv += ["--address", "auto"]
    return argv


if __name__ == "__main__":
    from nas.cli import main

    sys.exit(main(search_argv(sys.argv[1:])))
