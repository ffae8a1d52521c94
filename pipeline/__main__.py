"""`python -m pipeline ...` is the `pipeline` command (for environments without the entry point)."""
from pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="pipeline")
