"""iii: a backend orchestration engine on trio, wire-compatible with the official iii SDKs."""

__version__ = "0.1.0"
