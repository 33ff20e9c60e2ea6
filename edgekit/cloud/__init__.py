"""The cloud side: CEMA's adaptation service (foundation model, student distillation, HTTP API)."""
