"""Benchmarks: `python -m bench.<module>`, each printing `bench <name> <value> <unit>` lines."""
