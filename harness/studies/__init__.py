"""Simulation studies: coverage, bias, Type I error, power and SBC (see :mod:`harness.studies.command`).

Modules: ``core`` (conditions, fitters, seeds, one task), ``partially_clustered``
and ``sbc`` (the studies), ``summary`` (measures with Monte Carlo SEs),
``execute`` (local / Dask runs, Parquet store, resume), ``figures`` and
``report`` (the HTML study report), ``catalog`` (named studies).
"""
