"""The command-line programs, each a composition root of its own: ``python -m trainer`` (``train``),
``python -m trainer.cache`` (``cache``), ``python -m trainer.export`` (``export``) and ``python -m trainer.data``
(``data``). Each ``python -m`` entry point is the ``__main__`` of the package whose library the program runs."""
