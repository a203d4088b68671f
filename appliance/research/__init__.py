"""Research exports of the store: a per-scan CSV and the paper's cohort statistics.

Huang et al. 2020 (Radiology: Cardiothoracic Imaging): percentage of lung opacification (PLO)
per lobe, side and whole lung at baseline and two follow-ups, compared across clinical types.

* :mod:`.dataset`: the store's current results as rows (one per scan), with the serial
  comparison recomputed from the current results and the latest review.
* :mod:`.csv_export`: ``appliance export csv``; its docstring documents every column.
* :mod:`.stats`: the statistical tests (scipy.stats) and the normality rule that chooses them.
* :mod:`.cohort`: the paper's analysis (time points x clinical types) as one dict.
* :mod:`.plot`: PLO against days since onset with a cubic fit (PNG, matplotlib Agg).
* :mod:`.report`: summary.md and stats.json.
* :mod:`.cli`: the subcommands, added to the main CLI by ``register(subparsers)``.

Intended use: research and triage support; not a diagnosis.
"""
