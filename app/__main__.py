"""`python -m app <command>`: the operator's entry point."""
from app.cli import main

main()
