"""Outputs: Beam sinks (WriteToX) over batches of decoded records."""
