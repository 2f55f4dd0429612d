"""``python -m trainer.search OVERRIDES``: choose the cut by distilling candidates briefly (``trainer.cli.search``)."""

from trainer.cli.search import main

main()
