"""Measurements: training-step time vs diffusers (step_time), trial start-up on a real sweep
(startup), the preset table (model_table), and `ditscale bench` / `ditscale models` (commands)."""
