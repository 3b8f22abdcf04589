"""``python -m nas``: the ``vitnas`` command, e.g. under ``torchrun --nproc_per_node 2 -m nas train-supernet ...``."""

import sys

from nas.cli import main

sys.exit(main())
