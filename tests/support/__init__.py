"""Helpers shared by the test modules (issue 28 item 6): no test module imports another one.

Fixtures stay in tests/conftest.py (pytest finds them there; a fixture imported into a module is a
separate instance per module). Plain helpers live here, one module per concern:

- study.py: ROOT, tiny_study, write_study, ditscale (the real CLI in a subprocess)
- procs.py: free_port (harness.common.net's rule), torchrun (two ranks of `ditscale train`)
- slurm.py: the one-node test cluster's jobs (Job, submitted_job, slurm, job_info, ...)
- netns.py: the three-host network-namespace cluster (start/stop scripts, submitted, run_to_completion)
- chromium.py: the headless browser (chromium_or_skip, CDP) and DITSCALE_REQUIRE_CHROMIUM
- dit_paper.py: the DiT paper's Table 4 (GFLOPs, parameters)
- synthetic.py: synthetic sweeps logged into a real MLflow store, check_report
- phema.py: the post-hoc EMA checks test_train's kill-and-resume trial runs
- evaluation.py: an Evaluator on a tiny trial
- shared.py: session data (the packed datasets) built once per run and shared by the xdist workers
"""

from tests.support.study import ROOT, ditscale, tiny_study, write_study

__all__ = ["ROOT", "ditscale", "tiny_study", "write_study"]
