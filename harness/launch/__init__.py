"""Running a study: Ray Tune over the grid with a Ray Train job per trial (sweep, ray_backend), the
dry-run plan (plan), Slurm submission and its batch-script helpers (slurm), and `ditscale sweep` /
`ditscale slurm` (commands)."""
