"""Stage 1, the public anchor: a dense OLMo-2 model trained on public text (`train_anchor`) or adopted
(`init_anchor`), with r_pub and the fingerprint every expert is checked against (format: flexmoe/io/anchor.py)."""
