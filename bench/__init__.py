"""The checkout's bench folder: committed runs (``results/``), the GPU script (``gpu_check.sh``)
and ``collect_gpu_results``. The scenarios themselves ship in :mod:`tolaria.bench`."""
