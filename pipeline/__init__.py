"""dnstap receiver pipeline: configuration, command line and pipeline assembly."""
