"""Commands: merge, add, remove, extract, inspect (owned by the checkpoint-tool work)."""
