from .cli import entry, main  # noqa: F401 - main: the in-process entry point

# guarded: isolated workers (qmrkit serve --isolate) import the main module again
if __name__ == "__main__":
    entry()
