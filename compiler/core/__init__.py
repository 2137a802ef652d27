"""Layer 0: what every layer may know. Errors and exit codes, every fact about a target, profile text."""
