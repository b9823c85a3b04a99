"""The adapter: the LoRA layer that wraps a frozen layer (`lora`), injecting it into a model (`inject`),
the masks that choose its kept rows and columns (`masks`, `snip`), branches that share one input
(`input_groups`), the PEFT baselines (`peft_baselines`) and the one interface the stages use (`protocol`).

Nothing here trains, reads a config file or touches the run dir.
"""
