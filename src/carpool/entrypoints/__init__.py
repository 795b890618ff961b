"""Entry points: the CLI subcommands (the HTTP server lives in ``carpool.server``)."""
