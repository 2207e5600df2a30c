"""``python -m agmm_lightning``: the same CLI as ``agmm``."""

from agmm_lightning.cli import main

if __name__ == "__main__":
    main()
