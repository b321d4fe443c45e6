"""`python -m defense.compact B_PRIME.h5 [--layer conv_3] [--out OUT.h5] [--data FILE.h5] [--divisor 1]`:
a pruned network without its pruned channels. The implementation is defense/pruning/compact.py."""

from defense.pruning.compact import main

if __name__ == "__main__":
    raise SystemExit(main())
