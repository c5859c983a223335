"""The nbd-backup daemon: command line, configuration, QMP monitor, registry."""
