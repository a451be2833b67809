"""Running a study: the sweep driver (sweep), one Tune trial and its Ray Train workers (tune_trial), WSD
trunks and cooldown branches (branches), the dry-run plan (plan), the embedded or joined Ray
(local_ray), one sweep per study (study_lock), the torch-free rendezvous backend (ray_backend), Slurm
submission and its batch-script helpers (slurm), and `ditscale sweep` / `ditscale slurm` (commands)."""
