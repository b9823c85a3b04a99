"""The models an adapter goes into: backbones with a new head (`backbones`, `classifier`), causal
language models scoring choices (`causal_lm`), several tasks on one backbone (`multitask`), and
where a model's weights are read from (`source`)."""
