"""`python -m shard_svc ...` is `cpumesh shard ...`."""

import sys

from services.cli import main

sys.exit(main(["shard", *sys.argv[1:]]))
