"""Layer 4, analyses the passes read: calibration data and tables (and their checks), sensitivity ranking."""
