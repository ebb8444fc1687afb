"""``tolaria bench``: side-by-side benchmarks of tolaria against the ways it replaces.

One module per scenario group: :mod:`~tolaria.bench.snapshot` (snapshot and restore),
:mod:`~tolaria.bench.health` (health checks), :mod:`~tolaria.bench.training` (the guarded training
step and rollback), :mod:`~tolaria.bench.host_cost` (host time of a guarded step's Governor calls,
CUDA); :mod:`~tolaria.bench.runner` runs them all and :mod:`~tolaria.bench.goals` judges the run
against the goals of issue #18. It ships with the package, so ``tolaria bench`` runs from a plain
``pip install tolaria``; the repository's ``bench/`` folder keeps the committed runs and the GPU
script. Nothing is imported here: building the CLI's parser must not load the scenarios.
"""
