"""Benchmarks: ``python -m mchar bench NAME`` runs ``mchar.bench.<name with - as _>:main(argv)``.

Each benchmark measures side by side in one run (medians over repeats) and prints exactly one JSON object.
"""
