"""``python -m tqc`` runs the command-line interface."""

from tqc.compiler.cli.main import main

if __name__ == "__main__":
    main()
