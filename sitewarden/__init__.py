"""Sitewarden: bring small models to regulated data, with proof of every decision.

This package is the small shared kernel: the `sitewarden` command line and what the
controller and the agent share.
"""

__version__ = "0.1.0"
