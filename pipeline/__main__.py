"""`python -m pipeline` runs the embedpipe CLI."""
from .cli.main import main

main()
