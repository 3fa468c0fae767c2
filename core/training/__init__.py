"""Training: the training loop and its callbacks, the precision plan, the background job queue, time
estimates, the Optuna search and the paper's ablation."""
