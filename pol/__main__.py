"""`python -m pol ...`: the `pol` command (so `torchrun --nproc-per-node N -m pol train ...` runs it in each process)."""

from cli import main

if __name__ == "__main__":
    main()
