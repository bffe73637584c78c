"""slmctl: the command line."""
