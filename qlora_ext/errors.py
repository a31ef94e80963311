"""The error classes qlora_ext raises for problems a user can fix. Each is a ValueError, so library callers that
catch ValueError keep working; the command line prints any of them as one line (`qlora-ext: error: ...`)."""


class SetupError(ValueError):
    """A bad model / device / dependency / output-dir / setting choice, reported before long work starts."""


class MissingDependencyError(SetupError):
    """An optional package a feature needs is not installed; the message says what to pip install."""


def require(module: str, package: str, feature: str):
    """import `module`, or raise MissingDependencyError naming the pip package `feature` needs."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{feature} needs the {package} package: pip install {package}") from None
