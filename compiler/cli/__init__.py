"""Layer 8, the command line: click commands (main.py, serve.py) and their value types (ranges.py)."""
