"""`ditscale ema`: post-hoc EMA of a trained trial (EDM2), the command line over harness/trial/posthoc_ema.py."""
