"""`python -m service` is the same as `studiohook`."""

from service.cli import main

main()
