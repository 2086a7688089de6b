"""`python -m service ...` runs the `hydra-rm` command line (handy where the script is not on PATH)."""

from service.cli import main

main()
