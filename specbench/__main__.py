"""`python -m specbench ...`: the same command line (the `deepspeed` launcher starts each rank this way)."""

from specbench.cli import main

main()
