"""Runs train.py in this process and kills it with SIGKILL at a chosen point: the fault injection
of the resume tests, kept out of train.py itself.

    python tests/crash_train.py POINT N [train.py arguments]

POINT, reached for the N-th time (counting from 1):
    ckpt      halfway through writing a checkpoint (its temporary file is left torn)
    update    right after an optimizer step, before that step's records are written
    record    between two record writes (after D and M of a step, before its null)
    backward  at the start of a step's second backward (the dissent in theta)
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import metrics  # noqa: E402
import train  # noqa: E402


def main():
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    reached = [0]

    def reach():
        """Count one more arrival at the point; True on the N-th."""
        reached[0] += 1
        return reached[0] == n

    def kill_before(owner, name):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if reach():
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, patched)

    def kill_after(owner, name):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            out = original(*args, **kwargs)
            if reach():
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, name, patched)

    def torn_save(obj, f, save=torch.save):  # f: the checkpoint's temporary file, open for writing
        save(obj, f)
        if reach():  # half the checkpoint's temporary file on disk, then death
            f.flush()
            f.truncate(f.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    if point == 'ckpt':
        torch.save = torn_save
    elif point == 'update':
        kill_after(torch.optim.AdamW, 'step')
    elif point == 'record':
        kill_before(metrics, 'sign_flip_null')
    elif point == 'backward':
        kill_before(metrics, 'theta_decomposition')
    else:
        sys.exit(f"unknown point {point}")
    train.main(argv)


if __name__ == '__main__':
    main()
