"""Step 0: load, validate, blend, split and tokenize datasets into the `data` artifact (see `stage.py`).

Public entry points: `stage.prepare`, `stage.validate_sources`, `artifact.load_phase`, `formatting.format_prompt`,
`gold.get_gold_scorer`, `sources.fingerprint_source`, and the demo task in `demo.py`.
"""
