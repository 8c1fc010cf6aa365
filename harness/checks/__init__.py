"""Comparing the two engines: alignment of offsets per draw, comparison tables and verdicts,
attribution of every gap, and the likelihood identity (marginal likelihood, Laplace) that proves
both fit the same model.
"""
