"""Entry point of ``python -m fxoffload``."""

from fxoffload.cli import main

raise SystemExit(main())
