"""The block layer and the backup engine: devices, filters, copy-before-write, jobs."""
