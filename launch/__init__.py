"""Multi-node launch and checks: `wanspeed launch` (runner.py: hostfile.py, environment.py,
monitor.py, run_sizes.py, ssh.py) and `wanspeed doctor` (doctor.py, which starts rank_check.py on
every rank; node_facts.py, checks.py, shared_fs.py). Nothing here imports ds_trainer: the ranks
run it by module name."""
