"""`python -m app <command>`: the operator's entry point."""
from app.cli.main import main

main()
