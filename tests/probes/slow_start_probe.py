"""train/main.py on a rank 0 that starts late (a slower node, imports from a slow shared
filesystem): it sleeps SLOW_START_S seconds before main.py runs, so before main.py holds its
stop signals. Usage: as main.py (see test_launch.py)."""

import os
import runpy
import sys
import time
from pathlib import Path

if os.environ.get("RANK") == "0":
    time.sleep(float(os.environ.get("SLOW_START_S", "3")))
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "train" / "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
