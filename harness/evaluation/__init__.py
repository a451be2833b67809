"""Evaluation: the Evaluator a trial runs at its eval steps (evaluator), clean-fid features and
reference statistics (features), the named stand-in extractors (standin), a saved checkpoint evaluated
(from_checkpoint), and `ditscale eval` / `ditscale assets` (commands)."""
