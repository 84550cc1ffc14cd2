"""`python -m pipeline` runs the embedpipe CLI."""
from .cli import main

main()
