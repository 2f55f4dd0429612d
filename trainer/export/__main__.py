"""``python -m trainer.export SOURCE quantize=...``: a quantized export (``trainer.cli.export``)."""

import sys

from trainer.cli.export import main

sys.exit(main(sys.argv[1:]))
