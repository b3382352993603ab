"""The experiment spec: its schema, defaults (the study's), validation and JSON Schema. No torch."""
