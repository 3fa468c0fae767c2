"""The explanation audit."""
