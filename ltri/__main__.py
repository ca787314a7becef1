"""``python -m ltri`` runs the command line."""

from ltri.cli.app import main

main()
