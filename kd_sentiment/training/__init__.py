"""Training: the one loop, the losses, soft targets, transfer sets, evaluation, and the teacher and
distill steps. Imports the core only."""
