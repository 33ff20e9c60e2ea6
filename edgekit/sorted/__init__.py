"""edgekit.sorted."""
