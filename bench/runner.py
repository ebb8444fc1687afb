"""``python -m bench.runner``: the bench from a checkout, as before it moved into the package.

The scenarios live in :mod:`tolaria.bench` (so ``tolaria bench`` runs from a plain install);
this shim keeps the old command working and takes the same options.
"""

from tolaria.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m bench.runner"))
