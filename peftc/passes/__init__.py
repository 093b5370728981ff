"""Graph passes, one per file: insert, strip, swap (modules_to_save), merge, lower."""
