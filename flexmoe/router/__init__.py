"""The router stage: where router rows start (`rows.py`, `embed.py`), the biased router every FlexOlmo model runs
(`biased.py`), and what may change it after the merge: proxy selection (`proxy.py`) and router tuning (`tune.py`)."""
