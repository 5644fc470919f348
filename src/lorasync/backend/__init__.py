"""The engine a run talks to, whichever kind: `open.open_engine` builds a colocated engine
(`engines/`) or connects to running servers (`server/client/`), and `check.run_sync_check`
checks a sync against either. Above both, so that neither imports the other.
"""
