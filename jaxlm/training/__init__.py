"""Training: one path for every mode. An objective (what to minimise) goes into the one step factory
(`step.py`), the run is assembled once (`assembly.py`) and driven by the one loop (`loop.py`) with hooks."""
