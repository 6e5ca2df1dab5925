"""Run ``internvl-jax COMMAND SRC DST ...`` and send it SIGNAL at POINT; a helper of tests/test_atomic_outputs.py.

    python tests/killed_run.py SIGNAL POINT COMMAND SRC DST [options]

The process signals itself at a fixed step of its run, so a kill lands at the same place every time (a kill sent
from outside after a delay would land wherever the run happens to be). The steps are filesystem operations seen
through wrappers installed here, in this test process only; the code under test has no hook for them:

- ``writing``: the first progress-bar update (some tensors written or handed to the writer, others not);
- ``rename-N``: just before the N-th rename of an entry of DST's folder (the swap's steps);
- ``deleting``: a deletion of a folder in DST's folder, after its first file is gone.

SIGKILL ends the run there; SIGTERM and SIGINT are raised in it at the next Python step, as a real signal is.
"""

import os
import shutil
import signal
import sys

import tqdm.std

from internvl_jax.cli import main


def stop_at(point: str, sig: int, dst: str) -> None:
    """Install the wrappers that send ``sig`` to this process at ``point`` of writing ``dst``."""
    folder = os.path.dirname(os.path.abspath(dst))
    beside = lambda path: os.path.dirname(os.path.abspath(path)) == folder  # noqa: E731
    renames, stopped = 0, False

    def stop():
        nonlocal stopped
        if not stopped:  # once: the cleanup that a caught signal starts goes through these wrappers too
            stopped = True
            os.kill(os.getpid(), sig)

    def renaming(real):
        def rename(src, dst, *args, **kwargs):
            nonlocal renames
            if beside(src):
                renames += 1
                if point == f"rename-{renames}":
                    stop()
            return real(src, dst, *args, **kwargs)
        return rename

    real_rmtree, real_update = shutil.rmtree, tqdm.std.tqdm.update

    def rmtree(path, *args, **kwargs):
        if point == "deleting" and beside(path):
            os.unlink(next(os.path.join(root, f) for root, _, files in os.walk(path) for f in files))
            stop()
        return real_rmtree(path, *args, **kwargs)

    def update(self, n=1):
        if point == "writing":
            stop()
        return real_update(self, n)

    os.rename, os.replace = renaming(os.rename), renaming(os.replace)
    shutil.rmtree, tqdm.std.tqdm.update = rmtree, update


if __name__ == "__main__":
    sig, point, argv = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3:]
    stop_at(point, sig, argv[2])
    sys.exit(main(argv))
