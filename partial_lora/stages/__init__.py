"""The five stages of a run, each one function `run(spec, run_dir, tracker) -> metrics` that wires
the floors below it together: probe → allocate → extract → retrain → evaluate.

The pipeline that runs them in order is `partial_lora.pipeline.runner`; what every stage builds
from the run's spec (data, model, adapter, loaders) is `partial_lora.working_set`.
"""
