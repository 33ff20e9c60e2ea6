"""edgekit.calibrate."""
