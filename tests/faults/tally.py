"""Run `embedpipe` counting commits (test_locks.py). Not collected: no ``test_`` prefix.

    EMBEDPIPE_TALLY=FILE EMBEDPIPE_TALLY_PAUSE=S python tests/faults/tally.py embed SHARDS... --out OUT ...

Every shard this process commits appends ``PID URL`` to FILE, after a pause of S seconds that keeps runs started
together running at the same time.
"""
import os
import sys
import time

from pipeline.embedding.run_folder import RunState

_commit = RunState.commit


def counted(self, url, name, **kw):
    time.sleep(float(os.environ.get("EMBEDPIPE_TALLY_PAUSE", "0")))
    rec = _commit(self, url, name, **kw)
    with open(os.environ["EMBEDPIPE_TALLY"], "a") as f:
        f.write(f"{os.getpid()} {url}\n")
    return rec


RunState.commit = counted

if __name__ == "__main__":
    from pipeline.cli import main

    sys.argv = ["embedpipe", *sys.argv[1:]]
    main()
