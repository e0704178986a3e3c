"""synthetic_edit dataset: a procedural edit world that needs no download."""
