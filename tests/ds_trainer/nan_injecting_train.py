"""`ds_trainer.train` with non-finite losses injected, for the skip-on-all-ranks tests.

NAN_AT="rank:step,..." makes that rank's loss NaN once at that step; "rank:step+" every time the
step is tried (to exercise the consecutive-failure stop). It patches `AdapterTrainer.compute_loss`
in this process only, so the training hot path carries no test hook.
"""
import os
import sys

from ds_trainer.adapter_trainer import AdapterTrainer
from ds_trainer.train import main

_fired: set[str] = set()
_real_compute_loss = AdapterTrainer.compute_loss


def _injected(step: int, rank: int) -> bool:
    for spec in (s.strip() for s in os.environ.get("NAN_AT", "").split(",") if s.strip()):
        always = spec.endswith("+")
        if spec.rstrip("+") == f"{rank}:{step}" and (always or spec not in _fired):
            _fired.add(spec)
            return True
    return False


def compute_loss_with_nans(self, batch, micro):
    loss = _real_compute_loss(self, batch, micro)
    return loss * float("nan") if _injected(self.step, self.rank) else loss


AdapterTrainer.compute_loss = compute_loss_with_nans

if __name__ == "__main__":
    sys.exit(main())
