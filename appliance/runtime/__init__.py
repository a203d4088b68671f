"""Inference backends behind one Protocol (base.py); `open_runner` picks and opens one."""

from appliance.runtime.base import BackendUnavailable, ModelSpec, Runner, load_manifest
from appliance.runtime.select import open_runner, resolve_backend

__all__ = ["BackendUnavailable", "ModelSpec", "Runner", "load_manifest", "open_runner", "resolve_backend"]
