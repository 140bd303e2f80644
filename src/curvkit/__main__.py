"""``python -m curvkit``: the same as the ``curvkit`` command."""

from .cli import main

main()
