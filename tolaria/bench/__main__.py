"""``python -m tolaria.bench``: the same bench as ``tolaria bench``."""

from tolaria.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
