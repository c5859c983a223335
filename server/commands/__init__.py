"""One module per ``nbd-backup`` subcommand (see ``server.cli``)."""
