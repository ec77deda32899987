"""Second-order (SOUL) and first-order unlearning of a forget set from a causal LM, with a TOFU-style
benchmark that needs no network: data, tiny models, objectives, the unlearner, and the evaluation."""
