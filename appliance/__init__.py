"""Bedside chest-CT opacification appliance (research and triage support; not a diagnosis)."""

__version__ = "0.1.0"
INTENDED_USE = "research and triage support; not a diagnosis"
