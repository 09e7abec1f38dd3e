"""What the driver records while trials run, as Tune callbacks: results.csv, TensorBoard, the console and
the Optuna record."""
