"""`ditscale slurm`: run a study across a Slurm allocation (the batch script is slurm/sweep.sbatch).

- submit.py: the login-node side: render slurm/sweep.sbatch with the job's options, check what would
  fail later, save the script and `sbatch` it;
- allocation.py: the allocation as the batch script uses it (nodes, CPUs, GPUs, port, Ray's temp folders,
  stop mark, auth mode) as KEY=value lines, and the job's Ray token;
- node.py: what the batch script runs on the nodes (the head's address, the Ray token file, the waits for
  Ray and the job's MLflow server; a Ray node in each srun step, its stop, and the batch shell's Ray stop);
- mlflow_server.py: the job's own MLflow server (--mlflow-server): start, wait, stop;
- watch.py: a worker's watch over its Ray head, which requeues the job when the head's host is lost.

Their commands are in harness/launch/commands.py (`ditscale slurm ...`); slurm/README.md says what the
job does and the environment variables it reads.
"""

from harness.launch.slurm.node import bindable, node_ip, wait_for_mlflow, wait_for_ray
from harness.launch.slurm.submit import DEFAULT_SIGNAL_SECONDS, SETTINGS_MARKER, render_script

__all__ = ["DEFAULT_SIGNAL_SECONDS", "SETTINGS_MARKER", "bindable", "node_ip", "render_script", "wait_for_mlflow",
           "wait_for_ray"]
