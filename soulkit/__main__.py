"""``python -m soulkit``: the same as the ``soulkit`` command."""

from .cli import main

raise SystemExit(main())
