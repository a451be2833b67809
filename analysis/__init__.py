"""Reads what MLflow stores into pandas; fits and plots scaling laws. Imports neither torch nor harness."""
