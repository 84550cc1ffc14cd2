"""Run an `embedpipe` command and SIGKILL it (like kill -9) at the K-th call of a function: a crash at an exact point.

    python tests/faults/killer.py MODULE.FUNCTION K embed SHARDS... --out OUT ...

e.g. ``os.replace 3`` dies just before the third file is renamed into place; ``faiss.write_index 1`` while an
index is written. K = 0 runs the command untouched; K < 0 hangs (sleeps) at the |K|-th call instead. Used by test_crash.py (not collected: no ``test_`` prefix).
"""
import importlib
import os
import signal
import sys
import time


def arm(target: str, k: int) -> None:
    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == -k:
            time.sleep(3600)
        return real(*args, **kwargs)

    setattr(mod, name, dying)


if __name__ == "__main__":
    target, k = sys.argv[1], int(sys.argv[2])
    if k:
        arm(target, k)
    from pipeline.cli import main

    sys.argv = ["embedpipe", *sys.argv[3:]]
    main()
