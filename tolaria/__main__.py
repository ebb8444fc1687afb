"""``python -m tolaria`` is the ``tolaria`` command."""

from tolaria.cli import main

raise SystemExit(main())
