"""Cloud transports, installed as ``pydisco.transports``."""
