"""Pipeline stages run by ``mchar fit``: each takes the :class:`~mchar.pipeline.RunContext`."""
