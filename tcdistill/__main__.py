"""`python -m tcdistill ...`: the `tcdistill` console script (where the scripts folder is not on PATH)."""

from .cli import main

main()
