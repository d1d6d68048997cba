"""Composable PTransforms over batches of decoded dnstap records."""
