"""Real models as local folders: `get-model` conversion (`convert.py`) of the models the
registry knows (`registry.py`), and `resolve.resolve_model`, which turns a folder, a
`get-model` name or a hub name into the folder everything else loads from. Also tiny random
models built locally (`tiny.py`, `lorasync make-tiny`), for tests, the tiny demo and the bench."""
