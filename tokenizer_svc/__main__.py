"""`python -m tokenizer_svc ...` is `cpumesh tokenizer ...`."""

import sys

from services.cli import main

sys.exit(main(["tokenizer", *sys.argv[1:]]))
