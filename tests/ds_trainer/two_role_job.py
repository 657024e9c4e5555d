"""A second job built on the `Trainer` base alone, as DMD will be: two trainable roles (two
DeepSpeed engines, each its own optimizer), its own config, name and checkpoint prefix, and no
line of AdapterTrainer. Registered in `JOBS` when imported; run it as
`python -m tests.ds_trainer.two_role_job --config C --logdir D` (the `wanspeed train` options)."""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from ds_trainer import config
from ds_trainer.engine import build_engine
from ds_trainer.trainer import Trainer

JOB = "two-roles"
config.JOBS[JOB] = ("tests.ds_trainer.two_role_job:TwoRoleConfig", "tests.ds_trainer.two_role_job:TwoRoleTrainer")


@dataclass
class TwoRoleConfig(config.RunConfig):
    job: str = JOB
    """This job."""
    lr: float = 0.1
    """Both roles' learning rate."""
    samples: int = 16
    """Dataset size."""


class Points(torch.utils.data.Dataset):
    """Fixed points of a plane y = sum(x) / 2 - 1 with a little noise."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True) / 2 - 1 + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TwoRoleTrainer(Trainer):
    name = JOB
    checkpoint_prefix = "checkpoint_tworoles_"
    cfg: TwoRoleConfig

    def build_models(self) -> None:
        self.student, self.critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def build_engines(self) -> dict[str, Any]:
        return {role: build_engine(m, self.ds_config, lr=self.cfg.lr)
                for role, m in (("student", self.student), ("critic", self.critic))}

    def build_data(self):
        return Points(self.cfg.samples)

    def make_loader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                           drop_last=True)

    def train_step(self, batch, micro: int) -> Optional[dict[str, float]]:
        x, y = batch
        student, critic = self.engines["student"], self.engines["critic"]
        loss = torch.nn.functional.mse_loss(student(x), y)
        student.backward(loss)
        student.step()
        critic_loss = torch.nn.functional.mse_loss(critic(x), student(x).detach())
        critic.backward(critic_loss)
        critic.step()
        return {"loss": loss.item(), "critic_loss": critic_loss.item()}

    def write_exports(self, tmp: Path) -> None:
        if self.rank == 0:
            save_file({k: v.detach().clone() for k, v in self.student.state_dict().items()}, str(tmp / "student.safetensors"))


if __name__ == "__main__":
    from ds_trainer.train import main
    sys.exit(main())
