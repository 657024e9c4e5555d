"""`python -m ds_trainer.commands ...` is `wanspeed ...`."""
import sys

from ds_trainer.commands import main

sys.exit(main())
