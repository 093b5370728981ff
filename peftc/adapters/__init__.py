"""Built-in adapter kinds, one per file."""
