"""Graph passes: find attention, analyse masks, canonicalise, lower, clean up."""
