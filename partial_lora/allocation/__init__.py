"""Per-layer keep ratios: the allocators and their result (`allocators`), the searches that measure
the trained probe (`search`), and the replay that makes those searches cheap (`replay`)."""
