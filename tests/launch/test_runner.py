"""`wanspeed launch` without processes: its refusals, DeepSpeed's command line, `.deepspeed_env`;
and the SIGKILL message on real killed children."""
import logging
import stat
import sys

import pytest

from ds_trainer.commands import main as wanspeed
from launch.environment import EnvFileError, deepspeed_env
from launch.monitor import run_watched
from launch.runner import (LaunchError, LaunchPlan, check_command, check_plan, deepspeed_command, exit_status,
                           launch_environment)
from launch.run_sizes import configured_sizes
from tests.launch.conftest import write_hostfile

TRAIN = ["train", "--config", "configs/tiny_opens2v.yaml", "--logdir", "out/run"]
SELF_SIGKILL = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def test_a_hostfile_that_does_not_exist_is_a_one_line_error_naming_it(tmp_path, capsys):
    missing, logdir = tmp_path / "hostfile", tmp_path / "run"
    assert wanspeed(["launch", "--hostfile", str(missing), "--", *TRAIN[:-1], str(logdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wanspeed launch: error: hostfile {missing} does not exist"
    assert not logdir.exists()  # refused before anything was written (DeepSpeed would train on this machine)


def test_a_broken_hostfile_through_the_cli_names_the_line(tmp_path, capsys):
    hostfile = write_hostfile(tmp_path, "node-a slots=1\nnode-a slots=1\n")
    assert wanspeed(["launch", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "0", "--master-addr",
                     "127.0.0.1", "--", *TRAIN]) == 2
    assert capsys.readouterr().err.strip() == (f"wanspeed launch: error: {hostfile}:2: host 'node-a' is listed twice "
                                               f"(first on line 1)")


def test_no_ssh_needs_a_node_rank_in_range_and_a_master_address(tmp_path):
    hostfile = write_hostfile(tmp_path)
    with pytest.raises(LaunchError, match="--no-ssh needs --node-rank"):
        check_plan(LaunchPlan(hostfile, no_ssh=True, node_rank=0))
    with pytest.raises(LaunchError, match=r"--node-rank 2: the launch has 2 nodes \(node-a, node-b\), so it must be "
                                          r"in 0..1"):
        check_plan(LaunchPlan(hostfile, no_ssh=True, node_rank=2, master_addr="10.0.0.1"))
    with pytest.raises(LaunchError, match="--node-rank 1: the launch has 1 nodes"):  # --num-nodes counts
        check_plan(LaunchPlan(hostfile, no_ssh=True, node_rank=1, master_addr="10.0.0.1", num_nodes=1))
    with pytest.raises(LaunchError, match="only applies with --no-ssh"):
        check_plan(LaunchPlan(hostfile, node_rank=0))
    with pytest.raises(LaunchError, match="cannot be launched on every rank"):
        check_command(["sample", "--logdir", "x"])
    with pytest.raises(LaunchError, match="train needs --logdir"):
        check_command(["train", "--config", "c.yaml"])


def test_deepspeed_command_line_for_both_modes(tmp_path):
    hostfile = write_hostfile(tmp_path)
    ssh = deepspeed_command(LaunchPlan(hostfile, num_nodes=2, num_gpus=1, master_port=1234), "ds_trainer.commands",
                            TRAIN, python="py")
    assert ssh == ["py", "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port", "1234",
                   "--num_nodes", "2", "--num_gpus", "1", "--no_local_rank", "--module", "ds_trainer.commands", *TRAIN]
    no_ssh = deepspeed_command(LaunchPlan(hostfile, no_ssh=True, node_rank=1, master_addr="10.1.2.3",
                                          include="node-a@node-b", ssh_port=2222), "m", ["x"], python="py")
    assert no_ssh[8:] == ["--master_addr", "10.1.2.3", "--no_ssh", "--node_rank=1", "--include", "node-a@node-b",
                          "--ssh_port", "2222", "--no_local_rank", "--module", "m", "x"]
    assert "--exclude" in deepspeed_command(LaunchPlan(hostfile, exclude="node-b"), "m", [])


def test_deepspeed_env_carries_nccl_gloo_wandb_and_our_variables(tmp_path):
    own = tmp_path / "user_env"
    own.write_text("# the user's own file\nNCCL_IB_HCA=mlx5_0\nFOO=kept\n")
    environ = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_1", "GLOO_SOCKET_IFNAME": "eth0",
               "WANDB_PROJECT": "p", "WANDB_API_KEY": "k", "WANSPEED_ATTN_BACKEND": "sdpa", "DS_ACCELERATOR": "cpu",
               "HOME": "/root", "PATH": "/bin", "SECRET_TOKEN": "x"}
    env_file = tmp_path / "run" / ".deepspeed_env"
    env = launch_environment(LaunchPlan(write_hostfile(tmp_path), env={"WANDB_MODE": "offline"}), environ, env_file)
    assert env["DS_ENV_FILE"] == str(env_file.resolve())  # DeepSpeed's runner reads this file instead of ./.deepspeed_env
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # may hold WANDB_API_KEY
    lines = env_file.read_text().splitlines()
    assert "NCCL_SOCKET_IFNAME=ib0" in lines and "GLOO_SOCKET_IFNAME=eth0" in lines and "WANDB_API_KEY=k" in lines
    assert "WANDB_MODE=offline" in lines and "WANSPEED_ATTN_BACKEND=sdpa" in lines and "DS_ACCELERATOR=cpu" in lines
    assert not any(line.startswith(("HOME=", "PATH=", "SECRET_TOKEN=")) for line in lines)
    merged = deepspeed_env(environ, {}, existing=(own,))
    assert merged["FOO"] == "kept" and merged["NCCL_IB_HCA"] == "mlx5_1"  # the shell wins over the old file
    with pytest.raises(EnvFileError, match="WANDB_NOTES: a value with a line break"):
        deepspeed_env({"WANDB_NOTES": "a\nb"}, {}, existing=())
    no_ssh = launch_environment(LaunchPlan(write_hostfile(tmp_path), no_ssh=True, node_rank=1, master_addr="h",
                                           env={"WANDB_MODE": "offline"}), environ, tmp_path / "other" / ".deepspeed_env")
    assert no_ssh["WANDB_MODE"] == "offline" and "DS_ENV_FILE" not in no_ssh
    assert not (tmp_path / "other").exists()  # only node 0 records the file without ssh


def test_an_env_assignment_without_a_value_is_refused(tmp_path, capsys):
    hostfile = write_hostfile(tmp_path)
    assert wanspeed(["launch", "--hostfile", str(hostfile), "--env", "NOEQUALS", "--", *TRAIN]) == 2
    assert capsys.readouterr().err.strip() == "wanspeed launch: error: --env: expected KEY=VALUE, got 'NOEQUALS'"


def test_configured_sizes_read_the_yaml_and_the_command_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 2\nnum_training_frames: 21\npixel_height: 480\nwidth: 832\n"
                      "model: {preset: wan-14b, activation_checkpointing: true}\n")
    sizes = configured_sizes(["train", "--config", str(config), "--logdir", "d", "--zero", "3-offload",
                              "--set", "batch_size=4", "--set", "lr=1"])
    assert sizes == {"batch_size": 4, "num_training_frames": 21, "height": 480, "width": 832, "zero": "3-offload",
                     "model.preset": "wan-14b", "model.activation_checkpointing": True}
    assert configured_sizes(["train", "--config", str(tmp_path / "missing.yaml")]) == {}


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "launch.monitor"]


def test_a_sigkilled_rank_is_reported_as_likely_out_of_memory_with_the_sizes(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    sizes = "batch_size=4, num_training_frames=21, height=480, width=832"
    out = tmp_path / "out.txt"
    with open(out, "w") as fh:  # the child itself killed by SIGKILL
        code = run_watched([sys.executable, "-c", f"print('step 1', flush=True); {SELF_SIGKILL}"], {}, sizes, out=fh)
    assert code == -9 and exit_status(code) == 137
    assert out.read_text() == "step 1\n"  # the output is passed through
    (message,) = _messages(caplog)
    assert "return code -9" in message and "out of host memory" in message and sizes in message
    # DeepSpeed's launcher: a rank dies by SIGKILL, the launcher logs it and exits with sys.exit(-9) = 247
    caplog.clear()
    launcher = ("import subprocess, sys; r = subprocess.run([sys.executable, '-c', %r]); "
                "print(f'exits with return code = {r.returncode}', flush=True); sys.exit(r.returncode)" % SELF_SIGKILL)
    with open(out, "w") as fh:
        assert run_watched([sys.executable, "-c", launcher], {}, sizes, out=fh) == 247
    assert "return code = -9" in out.read_text()
    (message,) = _messages(caplog)
    assert "memory" in message and sizes in message


def test_a_failing_run_that_was_not_killed_gets_no_memory_message(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    with open(tmp_path / "out.txt", "w") as fh:
        assert run_watched([sys.executable, "-c", "raise SystemExit(3)"], {}, "batch_size=1", out=fh) == 3
    assert _messages(caplog) == []
