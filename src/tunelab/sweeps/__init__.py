"""Sweeps: many runs from one config (compare, scale, advise, the learning-rate search) and budget matching."""
