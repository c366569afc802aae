"""train/main.py on a rank whose view of output_dir is not rank 0's, as on a shared filesystem
whose nodes list or cache other files. Usage: as main.py, with PROBE_VIEW set (see
test_fault_tolerance.py):
- `listing`: rank 1 finds no checkpoint of its own; the run must resume where rank 0 says;
- `content`: rank 1 reads another step from the same checkpoint; the run must refuse.
Each rank writes the step it resumed from to OUTPUT_DIR/../view-rank{R}.txt."""

import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])
from train import checkpoint  # noqa: E402
from train.main import main  # noqa: E402

rank = int(os.environ["RANK"])
view = os.environ["PROBE_VIEW"]
load = checkpoint.load
if rank == 1 and view == "listing":
    checkpoint.find_resume = lambda *args, **kwargs: None


def loaded(accelerator, path, *args, **kwargs):
    state = load(accelerator, path, *args, **kwargs)
    if rank == 1 and view == "content":
        state.step -= 4
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir="))
    (Path(out).parent / f"view-rank{rank}.txt").write_text(f"{path} {state.step}")
    return state


checkpoint.load = loaded
sys.exit(main())
