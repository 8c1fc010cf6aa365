"""R code of the harness, installed as the package ``harness.r_scripts``.

Only the ``.R`` files matter; this file makes the folder an importable package
so that :mod:`importlib.resources` finds them after ``pip install .``.
"""
