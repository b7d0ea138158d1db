"""What the three scripts do, one module each: training, prediction on a folder, evaluation runs."""
