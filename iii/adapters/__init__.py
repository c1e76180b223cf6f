"""Adapters: the backends behind the modules, one package per kind.

Each ``iii/adapters/<kind>/`` package declares the ``<Kind>Adapter`` Protocol
and ``open_<kind>_adapter(cfg)``; each backend is one file beside it
(``memory.py``, ``redis.py``, ``rabbitmq.py`` …).  :mod:`iii.adapters.filelog`
is the durable record log that the file-based backends share.
"""
