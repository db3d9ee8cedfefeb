"""Real PyTorch GPU executor and replay driver (filled in by the backend issue)."""
