"""The core, shared by training and serving: the model contract (tensor names, metadata, the
preprocessing), decoding of every input format, the typed result and the one decision. Imports
nothing from the engine, the transports or training."""
