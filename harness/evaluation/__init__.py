"""Evaluation: the Evaluator a trial runs at its eval steps (evaluator), clean-fid features and
reference statistics (features), the named stand-in extractors (standin), and `ditscale eval` /
`ditscale assets` (commands). A saved checkpoint is evaluated in the trial room
(harness/trial/evaluate_checkpoint.py): it rebuilds the trial, and the trial room sits above this one."""
