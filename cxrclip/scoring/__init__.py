"""Scores → answers, in NumPy only: the zero-shot score formula, per-label calibration and operating points, and the
readers of a stored calibration. Shared by evaluation, the predictors and the torch-free bundle."""
