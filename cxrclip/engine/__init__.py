"""Training: the distributed environment, optimizer/schedule, the trainer loop, checkpoints."""
