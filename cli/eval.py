"""Commands: eval, generate (owned by the evaluation/inference work)."""
