"""Hospital simulator: synthetic patients, wearables, imaging devices and the files they produce."""

from simulator.hospital import DEFAULT_START, SimulationSummary, simulate

__all__ = ["DEFAULT_START", "SimulationSummary", "simulate"]
