"""Measures the host-memory peak of real training steps, for tests/ds_trainer/test_memory_plan.py.

Run as `python memory_probe.py JSON` in a fresh process with MALLOC_MMAP_THRESHOLD_ set low, so
that every tensor is its own mapping and is returned to the OS when freed (RSS then follows live
bytes). JSON: {"arch": WanConfig fields, "frames", "height", "width" (latent), "checkpointing",
"full": train every parameter (else the adapter job's reference layers)}. Builds the generator
as the trainer does without ZeRO (ds_trainer/generator.py), a torch AdamW over the trainable
parameters (ds_trainer/engine.py), runs one step (the optimizer states appear), resets the peak
RSS (/proc/self/clear_refs 5), runs a second step and prints {"peak_bytes": the anonymous memory
at step 2's peak (VmHWM less the file-backed and shared pages) minus RssAnon before the model was
built}.
"""
import gc
import json
import sys

import torch


def status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    from ds_trainer.flow_step import flow_matching_loss, step_generator
    from ds_trainer.memory_trace import Shapes, adapter_inputs
    from ds_trainer.trainable import apply_freeze, reference_trainable_patterns
    from model.config import WanConfig
    from model.flow_matching import FlowMatchingScheduler
    from model.wan import WanModel

    cfg = WanConfig.from_dict(spec["arch"])
    scheduler = FlowMatchingScheduler()

    def trainer(shapes: Shapes):
        """A generator, its optimizer and one training step on `shapes`, as the trainer runs them."""
        model = WanModel(cfg)  # what ds_trainer/generator.py builds without ZeRO (it also imports deepspeed)
        apply_freeze(model, (r".",) if spec["full"] else reference_trainable_patterns(cfg))
        model.gradient_checkpointing = spec["checkpointing"]
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(i: int) -> None:
            inputs = adapter_inputs(cfg, shapes, torch.device("cpu"))
            loss = flow_matching_loss(model, inputs, scheduler, step_generator(0, i, 0, 0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    # the libraries' own one-time allocations (thread pools, GEMM buffers) are no tensor of the
    # run: made by a throwaway run on one latent frame of 2 x 2, before the baseline
    trainer(Shapes(1, 1, 2, 2))(0)
    gc.collect()
    base = status("RssAnon")
    step = trainer(Shapes(1, spec["frames"], spec["height"], spec["width"]))
    step(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    step(1)
    # VmHWM counts file-backed pages too (library code paged in, resident, no tensor): the
    # anonymous memory at the peak is VmHWM minus those pages
    print(json.dumps({"peak_bytes": status("VmHWM") - status("RssFile") - status("RssShmem") - base}))


if __name__ == "__main__":
    main()
