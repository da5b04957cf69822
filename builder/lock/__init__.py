"""images.lock: the pinned description of a release, its schema, loading and writing."""
