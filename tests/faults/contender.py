"""One contender in a race for a dead owner's lock or claim (test_locks.py). Not collected: no ``test_`` prefix.

    python tests/faults/contender.py lock|claim OUT GO DELAY

Prints ``ready``, waits until the file GO exists, then takes the folder's lock (``lock``) or the claim of the
shard ``s`` (``claim``) and prints ``won`` or ``lost: ...``, and holds what it won for a second. DELAY seconds are
slept inside the liveness probe of the old owner (``os.kill(pid, 0)``), between reading the owner file and
replacing it: the window in which two contenders used to both take over a dead owner's lock and both run.
"""
import os
import sys
import time
from pathlib import Path

kind, out, go, delay = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
_kill = os.kill


def slow_probe(pid: int, sig: int) -> None:
    if sig == 0:
        time.sleep(delay)
    _kill(pid, sig)


os.kill = slow_probe

from pipeline.embedding.run_folder import RunState  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

state = RunState(out)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
if kind == "lock":
    try:
        state.acquire()
        print("won", flush=True)
    except UserError as e:
        print(f"lost: {e}", flush=True)
else:
    ours, held, _ = state.claim_shards({"u": "s"})
    print("won" if ours else f"lost: held by pid {held['u'].get('pid')}", flush=True)
time.sleep(1.0)  # then exit without releasing: its file is a dead owner's again
