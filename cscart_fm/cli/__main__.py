"""``python -m cscart_fm.cli``: the ``cscart-fm`` command."""

from cscart_fm.cli import main

main()
