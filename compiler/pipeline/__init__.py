"""Layer 6, the pipeline: its text (spec.py) and the generic, verifying pass manager (manager.py)."""
