"""``python -m trainer.cache OVERRIDES``: write the teacher cache (``trainer.cli.cache``)."""

from trainer.cli.cache import main

main()
