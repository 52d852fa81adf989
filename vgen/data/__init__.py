"""Procedural data (moving-shapes videos with captions, deforming shapes) lands here."""
