"""Multi-turn rollouts: an environment answers each policy turn (a tool result, a user
message) or ends the episode (docs/environments.md). `protocol.py`: what an environment is
and how a config names one; `episodes.py`: the runner that plays a batch of episodes against
an engine, turn by turn, the engine batching the turns of all episodes.
"""
