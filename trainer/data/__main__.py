"""``python -m trainer.data OVERRIDES``: tokenize the run's data into shards (``trainer.cli.data``)."""

from trainer.cli.data import main

main()
