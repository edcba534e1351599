"""Examples that run on detectflow: small, self-contained, reproducible."""
