"""A stop request delivered twice at once (a burst) and then again later: the burst is one
request; the later one records the abort in the run's status, then ends the process by the
signal. Usage: stop_twice_probe.py RECORD_FILE (see test_abuse.py); RECORD_FILE is the
status record ($DENOISE_STATUS_FILE) that a job script would read."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ["DENOISE_STATUS_FILE"] = sys.argv[1]
from train.lifecycle import BURST_S, RunStatus, StopFlag  # noqa: E402

record = Path(sys.argv[1])
flag = StopFlag(RunStatus())
flag.install()
flag.deferred = True  # as in the training loop
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy, microseconds later
time.sleep(0.2)
assert flag.signum == signal.SIGTERM and not record.exists(), (flag.signum, record.exists())
print("burst ignored", flush=True)
time.sleep(BURST_S)
os.kill(os.getpid(), signal.SIGTERM)  # asked again: stop at once
time.sleep(10)
sys.exit(3)  # not reached when the second request works
