"""The one package the gateway, the operator and the trainer may all import.

It holds only shapes and names (stdlib + pydantic): the TrainingSession resource, its conditions
and phases, the gateway↔trainer internal API, the trainer's environment, tinker:// paths and the
model catalogue. Anything that *does* something lives in a component.
"""
