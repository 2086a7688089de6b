"""`python -m cli ...` runs the `hydra-rm` command line (handy where the script is not on PATH)."""

from cli.main import main

main()
