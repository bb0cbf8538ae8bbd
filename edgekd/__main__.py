"""``python -m edgekd`` is the ``edgekd`` command."""

from edgekd.cli import main

main()
