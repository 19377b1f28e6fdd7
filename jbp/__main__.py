"""``python -m jbp``: the ``jbp`` command line."""

from .cli import main

raise SystemExit(main())
