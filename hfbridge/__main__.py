"""`python -m hfbridge serve MODEL` works where the `hfbridge` script is not on PATH (e.g. in a notebook)."""
from hfbridge.entrypoints.cli import main

if __name__ == "__main__":
    main()
