"""edgekit.exporters."""
