"""`python -m synergy.cli` (and `torchrun -m synergy.cli train`): the `synergy` command."""

from synergy.cli import main

main()
