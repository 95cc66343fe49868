"""``python -m flexlora``: the ``flexlora`` command line."""

from flexlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
