"""The public verbs of flexmoe, as typed functions.

Each verb takes a config object and paths and returns a small result dataclass. The CLI and the recipes
call only these. Sections are owned by separate modules; keep each verb a short orchestration.
"""

from __future__ import annotations

# ---- training verbs: train_anchor, init_anchor, embed_domain, train_expert ----

# ---- checkpoint verbs: merge, add, remove, extract, inspect, load_model ----

# ---- evaluation verbs: evaluate, generate ----
