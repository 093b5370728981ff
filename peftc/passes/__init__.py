"""Graph passes, one per file (inline, insert and strip, swap, bias, lower), their shared
builder, and merge: the weight side of merging."""
