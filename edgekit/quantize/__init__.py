"""edgekit.quantize."""
