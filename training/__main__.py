"""`python -m training train ...` / `accelerate launch -m training train ...` (multi-GPU, no project code)."""

import sys

from training.cli import run

run(sys.argv[1:])
