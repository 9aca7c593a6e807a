"""Layer 9, the command line (above integrations, which sit at layer 8 in the top-level integrations/ folder)."""
