"""Orchestration: configs, data, training, sweeps, evaluation. Depends on `models`, never on `analysis`."""
