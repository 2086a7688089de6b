"""The `hydra-rm` command line: the composition root, the one package that imports every other."""
