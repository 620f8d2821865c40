"""Trainable thin-plate-spline spatial transformer networks."""
