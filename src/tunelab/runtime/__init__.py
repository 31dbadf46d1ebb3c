"""What every room runs on: devices and precision, the process group, atomic file writes.

The bottom of the package: modules here import nothing else of tunelab.
"""
