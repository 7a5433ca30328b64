"""Run `ouro-train` and SIGKILL it just before its N-th `torch.save` of a file under DIR: a kill between
the files of a checkpoint save or of a universal conversion.

    python kill_hook.py DIR N [ouro-train arguments]
"""

import os
import signal
import sys

import torch

from ouro_train.cli import train


def main() -> None:
    target, count = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:3]
    original, seen = torch.save, 0

    def save(obj, f, *args, **kwargs):
        nonlocal seen
        if isinstance(f, (str, os.PathLike)) and os.path.abspath(f).startswith(target + os.sep):
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, f, *args, **kwargs)

    torch.save = save
    train()


if __name__ == "__main__":
    main()
