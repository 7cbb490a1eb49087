"""Driver, config, learner actor, objectives, checkpoints, metrics and the bench CLI."""
