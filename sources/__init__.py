"""Inputs: custom unbounded Beam sources over Frame Streams sockets."""
