"""`python -m flowgen`: the same command line as `flowgen`."""

from flowgen.cli import main

if __name__ == "__main__":
    main(prog_name="flowgen")
