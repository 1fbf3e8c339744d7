"""LRP rules and composites (which rule each layer gets)."""
