"""Stage 2, one data owner's expert: the anchor upcycled to two FFN slots with everything but the owner FFN,
router row and bias frozen (`upcycle.py`), trained on the owner's text (`train.py`) into an expert package."""
