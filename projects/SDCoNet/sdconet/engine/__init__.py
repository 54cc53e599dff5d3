"""Training: the step (train_loop), gradient routing maths, the config-built Trainer, EMA, checkpoints,
process launch and the one-step dry run (dry_run)."""
