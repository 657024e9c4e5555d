"""Per-role model-state memory (ds_trainer/engine_memory.py), counted from the tensors, on known sizes."""
import torch

from ds_trainer.engine_memory import role_memory

MB = 2 ** 20


def test_parameters_and_adam_states_are_counted_once_each():
    model = torch.nn.Linear(512, 1024, bias=False)  # 2 MiB of fp32 weights
    shared = torch.nn.Sequential(model, model)      # the same parameter twice is one storage
    assert role_memory(shared) == {"params_mb": 2.0, "optimizer_mb": 0.0, "cpu_mb": 2.0, "accelerator_mb": 0.0}
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()  # exp_avg + exp_avg_sq: 4 MiB, plus the 4-byte step counter
    got = role_memory(model, opt)
    assert got["params_mb"] == 2.0 and abs(got["optimizer_mb"] - 4.0) < 1e-4 and got["accelerator_mb"] == 0.0


def test_a_zero3_partition_counts_only_this_ranks_share():
    """A parameter DeepSpeed partitioned (its ds_tensor) counts its partition, not its full size."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_tensor = torch.zeros(MB // 4 // 2)  # half a MiB of fp32 on this rank
    module = torch.nn.Module()
    module.register_parameter("w", p)
    assert role_memory(module)["params_mb"] == 0.5
