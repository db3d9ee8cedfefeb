"""The SimPy serving engine and the `servesim` command line."""
