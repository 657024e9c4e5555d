"""The module `deepspeed --module ds_trainer.train --config ... --logdir ...` starts on every rank.

It is `wanspeed train` (options and body in ds_trainer/commands/train.py), kept under this name
because launch lines and scripts name it.
"""
from __future__ import annotations

import sys
from typing import Optional

from ds_trainer.commands import main as wanspeed


def main(argv: Optional[list[str]] = None) -> int:
    return wanspeed(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
