"""``python -m trainer OVERRIDES``: train (``trainer.cli.train``)."""

from trainer.cli.train import main

main()
