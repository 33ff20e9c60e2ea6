"""edgekit.snn."""
