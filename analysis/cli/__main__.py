"""``python -m analysis.cli``: the ``diffana`` command."""

from analysis.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
