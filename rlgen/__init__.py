"""rlgen: reward-driven post-training of generative models.

The Python API (rlgen.train, rlgen.sample, rlgen.score, rlgen.pairs, rlgen.evaluate, rlgen.merge,
rlgen.load_config, ...) is rlgen.api's, loaded on first use so that `import rlgen` and the CLI start fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: rlgen.api (and torch behind it) is imported only when an API name is first used
    import rlgen.api

    if name in rlgen.api.__all__:
        return getattr(rlgen.api, name)
    raise AttributeError(f"module 'rlgen' has no attribute '{name}'")


def __dir__():
    import rlgen.api

    return sorted(set(globals()) | set(rlgen.api.__all__))
