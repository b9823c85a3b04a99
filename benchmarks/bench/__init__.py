"""The pieces of `benchmarks/step_time.py` (the command-line entry point), one concept a module:

- `sizes`: the backbone sizes (`Size`, `SIZES`), random-init models and batches;
- `variants`: floor, PEFT LoRA, dense LoRA (ours) and Partial-LoRA copies of one backbone;
- `measure`: the training step, interleaved timing, memory and the analytic limit;
- `report`: the tables, the issue's targets, the demo run's allocation share, the machine line.
"""
