"""The `selective_copy` experiment: the Mamba paper's selectivity ablation (S6 vs LTI vs a Transformer)."""
