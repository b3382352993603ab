"""Side-by-side benchmark of slmcl's fast paths against the straightforward (naive) path.

``bench.naive`` holds the naive baseline (the study's way of doing each operation),
``bench.run_bench`` the driver (``python -m bench.run_bench``). Nothing here is imported by
``slmcl`` itself.
"""
