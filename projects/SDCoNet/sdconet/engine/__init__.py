"""Training: the step (train_loop), gradient routing maths, the config-built Trainer, EMA, checkpoints and process launch."""
