"""The benchmarks behind `lorasync bench ...` (the arguments: commands/bench_cli.py), one module
each: `sync` (and `server`, `bench sync --server`), `dtype`, `verdict` (its cases and report),
`trl` (lorasync against TRL's GRPOTrainer) and `rollout` (sync against async rollouts, and its
report). What machine they ran on: lorasync/machine.py, shared with sync/merge_kernel.py."""
