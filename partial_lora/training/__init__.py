"""Training and scoring a model: the one loop `fit` (`loop`), its optimizer and recipe, checkpoints,
the metrics log (`curve`), predictions and metrics, the device and precision (`runtime`), and the
failed-reading checks on a finished run's numbers."""
