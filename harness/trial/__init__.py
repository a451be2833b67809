"""One trial: build the model from the study (build), a compute budget's step count (budget), the
DeepSpeed engine with its LR schedule and muP groups (engine), the data stream (batches, conditioning),
the loop with its checkpoints, stop requests and start-up timing (loop, checkpoint, stopping,
startup), a saved checkpoint evaluated as training does (evaluate_checkpoint), and `ditscale train`
(commands). The process group is shared with evaluation: harness/common/process_group.py."""
