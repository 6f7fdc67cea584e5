"""`python -m trp_edge ...`, as torchrun runs it: `torchrun --nproc-per-node N -m trp_edge compress ...`."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="trp-edge")
