"""The study: results as tidy records, one seed-statistics rule, report tables and figures.

Nothing here imports a method package: a method's `report.py` turns its `Results` into bars,
verdicts and tables with these pieces, and the same function rebuilds a report from saved
results (`python -m launch.report --workdir=DIR`).
"""
