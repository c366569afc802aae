"""train/main.py with overrides of rank 1's own, as a node launched with other arguments (or
another version of the config file): PROBE_RANK1_OVERRIDES, space-separated, are added to rank
1's command line. Usage: as main.py (see test_distributed.py)."""

import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])
from train.main import main  # noqa: E402

extra = os.environ["PROBE_RANK1_OVERRIDES"].split() if os.environ["RANK"] == "1" else []
sys.exit(main(sys.argv[1:] + extra))
