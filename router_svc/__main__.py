"""`python -m router_svc ...` is `cpumesh router ...`."""

import sys

from services.cli import main

sys.exit(main(["router", *sys.argv[1:]]))
