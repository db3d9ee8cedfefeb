"""Request streams and trace readers (filled in by the engine issue)."""
