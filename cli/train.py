"""Commands: train-anchor, init-anchor, embed-domain, train-expert (owned by the training work)."""
