"""``python -m repc``: the same as the ``repc`` command (see :mod:`repc.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
