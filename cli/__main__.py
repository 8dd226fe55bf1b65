"""`python -m flexmoe.cli ...` runs the `flexmoe` command (for environments without the console script)."""

from flexmoe.cli import main

main(prog_name="flexmoe")
